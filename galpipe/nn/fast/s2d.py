"""Few-channel 3x3 convolution + ReLU + 2x2 max-pool as one GEMM per pooling window.

:class:`SpaceToDepthStep` runs a :class:`~galpipe.nn.conv.Conv2D` with a 3x3 kernel,
stride 1 and one pixel of padding, on few input channels (the first layer of a network
on RGB images), fused with the ``relu`` and 2x2 ``maxpool2d`` after it.

The four outputs of a pooling window (a 2x2 output tile) depend on a 4x4 input window,
taken at stride 2 of the padded input.  So the whole tile is one row of a GEMM::

    Y^T (4*F, P) = Wb^T (4*F, 16*C) @ P^T (16*C, P)

with ``P`` the number of tiles (pooled outputs), ``P^T`` the 4x4 windows (transposed
im2col) and ``Wb`` the kernel placed at the four offsets of the tile (zeros elsewhere).
A quarter of ``Wb`` is always zero: the tile's upper outputs never see window row 3, its
lower outputs never see row 0; so the product runs as two GEMMs, ``(2*F, 12*C)`` on window
rows 0-2 and on rows 1-3 (:func:`split_block_kernel`).  Against the 3x3 im2col with one
row per output pixel this does 1.33x the multiply-adds (1.78x as one GEMM) but in GEMMs
with 2x the columns (32 instead of 16 for F = 16: more efficient in BLAS), and copies
16*C values per tile instead of 4*9*C: 2.25x less im2col traffic.  Measured (3 -> 16 @ 64x64,
4-image pieces, 1 thread): the forward product 0.310 ms against 0.365 ms as one GEMM, the
weight-gradient product 0.376 against 0.407 ms; the whole layer, batch 64, interleaved in one
process (three runs of 40 pairs, median ratio one GEMM / split): inference 1.00-1.06x at 1
thread and 1.04-1.07x at 2, training (forward + backward) 0.96-1.04x and 0.99-1.00x.

Implementation notes (NumPy only):

* The padded input is first rearranged, per piece of :data:`PIECE_IMAGES` images, into
  a planar space-to-depth array ``(C, 2, 2, m, H/2+1, W/2+1)`` (channel, row parity,
  column parity); every row of ``P^T`` is then a plain 2-D slice of it with contiguous
  runs of ``W/2`` values (4 copies per piece).
* The four output blocks of the GEMM (rows ``(k, f)``, ``k = 2*dy + dx``) are contiguous,
  so the max-pool, its winner masks, the bias (added after the max, to 4x fewer values:
  ``max(y + b) == max(y) + b``) and the ReLU are contiguous ufuncs; the pooled result is
  written to the channels-last output with one transposing copy.
* In training, the patches ``P^T`` of the whole batch are kept for the weight gradient
  (``16*C + 1`` floats per tile; a row of ones gives the lower outputs' bias gradient from
  their GEMM, the upper outputs' is a sum), and four boolean masks per pooled output: ReLU
  passes and the right column wins, ReLU passes and the left column wins, and in each column
  whether the lower row wins.  The backward pass is then six contiguous ufuncs, two GEMMs
  (the halves of the forward's split) and one sum per piece.
* Tie rule of the max-pool: that of :class:`~galpipe.nn.fast.conv.ConvStep` (per column
  the upper row wins ties, then the left column).
* The input gradient (only when asked for: the first layer of a training step needs
  none) is ``Wb @ dY^T`` scattered back onto the space-to-depth array (4 sliced adds).

Results do not depend on the number of workers (pieces depend on the batch size only,
partial weight gradients are summed over them in a fixed order).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from galpipe.errors import ModelError
from galpipe.nn.conv import Conv2D
from galpipe.nn.fast.conv import checked_input
from galpipe.nn.fast.threads import BufferCache, batch_pieces, parallel_chunks, sum_arrays

#: Images per piece (the last pieces may hold one fewer); chosen by measurement on the
#: 3->16 @ 64x64 layer (4 beat 2 and 8).
PIECE_IMAGES = 4
#: Convolutions with at most this many input channels run here.  Measured against the
#: im2col step (1 thread, batch 64, 64x64 input, 16 filters; time ratios im2col / this):
#: C = 3: forward (training) 1.4-1.5x, inference 1.3-1.4x, backward (no input gradient)
#: 0.9-1.1x; C = 4: 2.0x, 1.4x, 1.06x; C = 8: 0.84x, 0.98x, 1.29x (no gain overall).
MAX_CHANNELS = 4


def eligible(conv: Conv2D, post: str | None) -> bool:
    """Whether ``conv`` (built), fused with ``post``, runs as a :class:`SpaceToDepthStep`:
    a 3x3 stride-1 kernel with one pixel of padding on every side, at most
    :data:`MAX_CHANNELS` input channels, an even input size, followed by ``relu`` and a
    2x2 max-pool (``post == "relu_pool"``)."""
    h, w, _ = conv.input_shape
    return (
        post == "relu_pool"
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv._pads == ((1, 1), (1, 1))
        and conv._in_c <= MAX_CHANNELS
        and h % 2 == 0
        and w % 2 == 0
    )


def block_kernel(w: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``Wb^T`` ``(4*F, 16*C)`` of a kernel ``w`` ``(3, 3, C, F)``: row ``(k, f)`` (output
    ``k = 2*dy + dx`` of the tile), column ``(r, s, c)`` (4x4 input window), holding
    ``w[r - dy, s - dx, c, f]`` where that index is valid and 0 elsewhere."""
    _, _, c, f = w.shape
    wb = np.zeros((2, 2, f, 4, 4, c))
    wt = w.astype(np.float64).transpose(3, 0, 1, 2)
    for dy in range(2):
        for dx in range(2):
            wb[dy, dx, :, dy : dy + 3, dx : dx + 3, :] = wt
    return np.ascontiguousarray(wb.reshape(4 * f, 16 * c), dtype=dtype)


def split_block_kernel(wbt: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """The nonzero halves of ``Wb^T`` ``(4*F, 16*C)`` (:func:`block_kernel`): rows of the
    tile's upper outputs (``dy = 0``) against window rows 0-2 (columns ``:12*C``) and of its
    lower outputs (``dy = 1``) against window rows 1-3 (columns ``4*C:``), each ``(2*F, 12*C)``
    and contiguous.  The quarter left out is zero."""
    f2 = wbt.shape[0] // 2
    return (np.ascontiguousarray(wbt[:f2, : 12 * c]), np.ascontiguousarray(wbt[f2:, 4 * c :]))


def fold_kernel_gradient(gwb: np.ndarray, c: int) -> np.ndarray:
    """The kernel gradient ``(3, 3, C, F)`` (float64) from the gradient of ``Wb^T``
    ``(4*F, 16*C)``: the adjoint of :func:`block_kernel` (a sum over the four offsets)."""
    f = gwb.shape[0] // 4
    g6 = gwb.astype(np.float64).reshape(2, 2, f, 4, 4, c)
    gw = np.zeros((3, 3, c, f))
    for dy in range(2):
        for dx in range(2):
            gw += g6[dy, dx, :, dy : dy + 3, dx : dx + 3, :].transpose(1, 2, 3, 0)
    return gw


def _phases(x: np.ndarray) -> Iterator[tuple[int, int, slice, slice, np.ndarray]]:
    """The four 2x2 phases ``(a, b)`` of ``x`` ``(m, H, W, C)`` with the ``(Y, X)`` slices they
    occupy in the one-pixel-padded half-size planes, and ``x`` viewed ``(m, H/2, 2, W/2, 2, C)``."""
    m, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    x6 = x.reshape(m, h2, 2, w2, 2, c)
    for a in range(2):
        for b in range(2):
            yield (a, b, slice(1, h2 + 1) if a == 0 else slice(0, h2),
                   slice(1, w2 + 1) if b == 0 else slice(0, w2), x6)


def space_to_depth(x: np.ndarray, xq: np.ndarray) -> None:
    """Write the padded ``x`` ``(m, H, W, C)`` (H, W even) into ``xq``
    ``(C, 2, 2, >=m, H/2+1, W/2+1)``: ``xq[c, a, b, n, Y, X] = xpad[n, 2Y+a, 2X+b, c]``
    with ``xpad`` padded by one pixel.  The zero border of ``xq`` is never written."""
    m = x.shape[0]
    for a, b, ys, xs, x6 in _phases(x):
        xq[:, a, b, :m, ys, xs] = x6[:, :, 1 - a, :, 1 - b, :].transpose(3, 0, 1, 2)


def depth_to_space(xq: np.ndarray, x: np.ndarray) -> None:
    """Inverse of :func:`space_to_depth` (the border is dropped): fill ``x``
    ``(m, H, W, C)`` from ``xq`` ``(C, 2, 2, >=m, H/2+1, W/2+1)``."""
    m = x.shape[0]
    for a, b, ys, xs, x6 in _phases(x):
        x6[:, :, 1 - a, :, 1 - b, :] = xq[:, a, b, :m, ys, xs].transpose(1, 2, 3, 0)


def window_patches(xq: np.ndarray, pt: np.ndarray, m: int) -> None:
    """The 4x4 windows at stride 2 as columns: ``pt`` ``(>=16*C, m*H/2*W/2)``, row
    ``(r, s, c)``, column ``(n, Y, X)``: ``xpad[n, 2Y + r, 2X + s, c]``.  Rows past
    ``16*C`` are left untouched."""
    c, _, _, _, hq, wq = xq.shape
    h2, w2 = hq - 1, wq - 1
    # r = 2R + a, s = 2S + b: rows ordered (R, a, S, b, c)
    p8 = pt[: 16 * c].reshape(2, 2, 2, 2, c, m, h2, w2)
    for big_r in range(2):
        for big_s in range(2):
            p8[big_r, :, big_s] = xq[:, :, :, :m, big_r : big_r + h2,
                                     big_s : big_s + w2].transpose(1, 2, 0, 3, 4, 5)


def scatter_windows(dpt: np.ndarray, dxq: np.ndarray, m: int) -> None:
    """Adjoint of :func:`window_patches`: add ``dpt`` ``(16*C, m*H/2*W/2)`` onto ``dxq``
    ``(C, 2, 2, >=m, H/2+1, W/2+1)`` (which the caller zeroes)."""
    c, _, _, _, hq, wq = dxq.shape
    h2, w2 = hq - 1, wq - 1
    p8 = dpt.reshape(2, 2, 2, 2, c, m, h2, w2)
    for big_r in range(2):
        for big_s in range(2):
            dxq[:, :, :, :m, big_r : big_r + h2, big_s : big_s + w2] += p8[
                big_r, :, big_s
            ].transpose(2, 0, 1, 3, 4, 5)


class SpaceToDepthStep:
    """``conv2d (3x3, few channels) + relu + maxpool2d (2x2)`` as one GEMM per pooling
    window, for an :func:`eligible` :class:`Conv2D`.

    Parameters
    ----------
    conv : Conv2D
        The (built) layer; its ``params`` are read and its ``grads`` written.
    post : {"relu_pool"}
        The only fusion this step runs.

    Notes
    -----
    Input ``(N, H, W, C)``, output ``(N, H/2, W/2, F)``.  Outputs, input gradients and
    parameter gradients equal the reference layers' up to float rounding (the kernel
    gradient is summed over the four tile offsets in float64).
    """

    algorithm = "s2d"
    kind = "conv_relu_pool"
    size = 3

    def __init__(self, conv: Conv2D, post: str | None = "relu_pool") -> None:
        if not eligible(conv, post):
            raise ModelError(
                "conv2d: the space-to-depth kernel needs a 3x3 stride-1 'same' kernel on at "
                f"most {MAX_CHANNELS} channels and an even input size, fused with relu and a "
                f"2x2 max-pool (got {post!r})"
            )
        self.conv = conv
        self.post = post
        self._bufs = BufferCache(max_entries=64)
        self._cache: dict[str, Any] = {}

    def _pieces(self, n: int) -> list[tuple[int, int]]:
        """Sample ranges of about :data:`PIECE_IMAGES` images (an even count when > 1)."""
        return batch_pieces(n, PIECE_IMAGES)

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """``maxpool2x2(relu(conv(x)))`` for ``x`` ``(N, H, W, C)``: ``(N, H/2, W/2, F)``."""
        conv = self.conv
        x = checked_input(conv, x)
        dt, n = x.dtype, x.shape[0]
        h, w, c = conv.input_shape
        f, h2, w2 = conv.filters, h // 2, w // 2
        q, kk = h2 * w2, 16 * c
        pieces = self._pieces(n)
        ps = max(b - a for a, b in pieces)
        wb0, wb1 = split_block_kernel(block_kernel(conv.params["W"], dt), c)
        bias = conv.params["b"].astype(dt)[:, None] if conv.use_bias else None
        out = np.empty((n, h2, w2, f), dtype=dt)
        pt_all = masks = None
        if training:
            pt_all = self._bufs.get("pt_all", (kk + 1, n * q), dt)
            pt_all[kk] = 1.0  # ones row: the bias gradient
            # (right & relu, left & relu, lower-left wins, lower-right wins), transposed
            masks = np.empty((4, f, n * q), dtype=bool)

        def work(k: int, lo: int, hi: int) -> None:
            xq = self._bufs.get(f"xq{k}", (c, 2, 2, ps, h2 + 1, w2 + 1), dt, zero=True)
            yb = self._bufs.get(f"y{k}", (4, f, ps * q), dt)
            lr = self._bufs.get(f"lr{k}", (2, f, ps * q), dt)
            alive_b = self._bufs.get(f"alive{k}", (f, ps * q), np.dtype(bool))
            for a, b in pieces[lo:hi]:
                m, p = b - a, (b - a) * q
                space_to_depth(x[a:b], xq)
                if pt_all is not None:
                    pt = pt_all[:kk, a * q : b * q]
                else:
                    pt = self._bufs.get(f"pt{k}", (kk, ps * q), dt)[:, :p]
                window_patches(xq, pt, m)
                y = yb[:, :, :p]
                # the outputs of the upper row of the tile (dy = 0) see window rows 0-2 only,
                # those of the lower row (dy = 1) rows 1-3: two GEMMs skip the zero quarter
                np.matmul(wb0, pt[: 12 * c], out=y[:2].reshape(2 * f, p))
                np.matmul(wb1, pt[4 * c : kk], out=y[2:].reshape(2 * f, p))
                left, right = lr[0, :, :p], lr[1, :, :p]
                np.maximum(y[0], y[2], out=left)
                np.maximum(y[1], y[3], out=right)
                if masks is not None:
                    mk = masks[:, :, a * q : b * q]
                    np.greater(y[2], y[0], out=mk[2])
                    np.greater(y[3], y[1], out=mk[3])
                    np.greater(right, left, out=mk[0])
                np.maximum(left, right, out=left)
                if bias is not None:
                    left += bias
                if masks is not None:
                    alive = alive_b[:, :p]
                    np.greater(left, 0, out=alive)
                    np.greater(alive, mk[0], out=mk[1])  # relu passes, left column wins
                    np.logical_and(mk[0], alive, out=mk[0])  # relu passes, right column wins
                # ReLU fused with the transposing write, in one call.  Measured against one call
                # per channel (contiguous reads; batch 64, 64x64x3 -> 16, one process,
                # interleaved, median of 30): about equal on 1 thread (-1% to +3%), 10-14% faster
                # on 2 workers (fewer Python-level calls contending for the GIL)
                np.maximum(left.T, 0, out=out[a:b].reshape(p, f))

        parallel_chunks(work, len(pieces), with_index=True)
        self._cache = {"n": n, "pieces": pieces, "pt_all": pt_all, "masks": masks,
                       "x": None if training else x, "dtype": dt}
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        """Fill the layer's ``grads`` from ``dout`` ``(N, H/2, W/2, F)``; return ``dx``
        ``(N, H, W, C)`` (None when the layer's ``input_grad_needed`` is False)."""
        conv, cache = self.conv, self._cache
        if not cache:
            raise ModelError("conv2d: backward called before forward")
        if cache["masks"] is None:
            # the forward pass ran in inference mode: redo it keeping patches and masks
            self.forward(cache["x"], training=True)
            cache = self._cache
        dt, n = cache["dtype"], cache["n"]
        h, w, c = conv.input_shape
        f, h2, w2 = conv.filters, h // 2, w // 2
        q, kk = h2 * w2, 16 * c
        dout = np.ascontiguousarray(dout, dtype=dt)
        if dout.shape != (n, h2, w2, f):
            raise ModelError(
                f"conv2d: backward expects a gradient of shape {(n, h2, w2, f)}, "
                f"got {dout.shape}"
            )
        pieces = cache["pieces"]
        ps = max(b - a for a, b in pieces)
        pt_all, masks = cache["pt_all"], cache["masks"]
        need_dx = conv.input_grad_needed
        dx = np.empty((n, h, w, c), dtype=dt) if need_dx else None
        wb = block_kernel(conv.params["W"], dt).T.copy() if need_dx else None

        def work(k: int, lo: int, hi: int) -> list[np.ndarray]:
            gt_b = self._bufs.get(f"g{k}", (f, ps * q), dt)
            db = self._bufs.get(f"d{k}", (4, f, ps * q), dt)
            parts = []
            for a, b in pieces[lo:hi]:
                m, p = b - a, (b - a) * q
                g = gt_b[:, :p]
                np.copyto(g, dout[a:b].reshape(p, f).T)
                mk = masks[:, :, a * q : b * q]
                d = db[:, :, :p]
                # right column: d[1] upper, d[3] lower; left column: d[0], d[2]
                np.multiply(g, mk[0], out=d[1])
                np.multiply(d[1], mk[3], out=d[3])
                np.subtract(d[1], d[3], out=d[1])
                np.multiply(g, mk[1], out=d[0])
                np.multiply(d[0], mk[2], out=d[2])
                np.subtract(d[0], d[2], out=d[0])
                d2 = d.reshape(4 * f, p)
                pt = pt_all[:, a * q : b * q]
                # gradient of Wb^T without its zero quarter (as the forward GEMMs): rows of the
                # upper outputs against window rows 0-2, of the lower ones against rows 1-3 and
                # the ones row (bias); the upper outputs' bias gradient is their sum
                gwb = np.zeros((4 * f, kk + 1), dtype=dt)
                np.matmul(d2[: 2 * f], pt[: 12 * c].T, out=gwb[: 2 * f, : 12 * c])
                np.matmul(d2[2 * f :], pt[4 * c :].T, out=gwb[2 * f :, 4 * c :])
                np.sum(d2[: 2 * f], axis=1, out=gwb[: 2 * f, kk])
                parts.append(gwb)
                if dx is not None:
                    assert wb is not None
                    dpt = self._bufs.get(f"dpt{k}", (kk, ps * q), dt)[:, :p]
                    np.matmul(wb, d2, out=dpt)
                    dxq = self._bufs.get(f"dxq{k}", (c, 2, 2, ps, h2 + 1, w2 + 1), dt)
                    dxq[...] = 0.0
                    scatter_windows(dpt, dxq, m)
                    depth_to_space(dxq, dx[a:b])
            return parts

        gwb = sum_arrays([p for parts in parallel_chunks(work, len(pieces), with_index=True)
                          for p in parts])
        conv.grads["W"][...] = fold_kernel_gradient(gwb[:, :kk], c)
        if conv.use_bias:
            conv.grads["b"][...] = gwb[:, kk].astype(np.float64).reshape(4, f).sum(axis=0)
        return dx
