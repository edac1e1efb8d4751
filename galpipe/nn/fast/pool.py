"""Fast max pooling (separable, threaded) and the ``relu, maxpool2d`` step.

:class:`MaxPoolStep` runs a :class:`~galpipe.nn.pooling.MaxPool2D` whose stride
equals its window (the usual case): pooling is then separable -- first the
maximum over the ``ph`` rows of each window (contiguous ``W*C`` runs, fast),
then over the ``pw`` columns -- and the winners are found in the backward pass
from the kept row maxima.  Tie rule: per column the upper row wins, then the
left column (the reference layer takes the first maximum in row-major window
order; the two differ only where a window holds equal maxima in different rows
and columns).
"""

from __future__ import annotations

import numpy as np

from galpipe.nn.activations import ReLU
from galpipe.nn.base import Step
from galpipe.nn.fast.elementwise import ReLUStep
from galpipe.nn.fast.threads import BufferCache, parallel_chunks
from galpipe.nn.pooling import MaxPool2D

#: Batches smaller than this many elements per chunk are pooled on one thread.
_MIN_PARALLEL = 1 << 16


def _min_chunk(x: np.ndarray) -> int:
    per_sample = max(int(np.prod(x.shape[1:])), 1)
    return max(1, _MIN_PARALLEL // per_sample)


class MaxPoolStep:
    """Separable threaded max pooling for a :class:`MaxPool2D` with ``stride == pool_size``.

    Input ``(N, H, W, C)``, output ``(N, Ho, Wo, C)``.
    """

    kind = "maxpool"
    size = 1

    def __init__(self, pool: MaxPool2D) -> None:
        self.pool = pool
        self._bufs = BufferCache()
        self._cache: dict[str, np.ndarray] = {}

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Pool ``x`` ``(N, H, W, C)``; keeps the row maxima for the backward pass."""
        self.pool._check_input(x)
        n, c = x.shape[0], x.shape[3]
        ho, wo = self.pool._out_hw
        ph, pw = self.pool.pool_size
        wc = wo * pw  # columns used (floor mode drops the rest)
        out = np.empty((n, ho, wo, c), dtype=x.dtype)
        rowmax = self._bufs.get("rowmax", (n, ho, wc, c), x.dtype)

        def work(lo: int, hi: int) -> None:
            xs = x[lo:hi, : ho * ph, :wc]
            r = rowmax[lo:hi]
            np.copyto(r, xs[:, 0::ph])
            for i in range(1, ph):
                np.maximum(r, xs[:, i::ph], out=r)
            r5 = r.reshape(hi - lo, ho, wo, pw, c)
            o = out[lo:hi]
            np.copyto(o, r5[:, :, :, 0])
            for j in range(1, pw):
                np.maximum(o, r5[:, :, :, j], out=o)

        parallel_chunks(work, n, min_chunk=_min_chunk(x))
        self._cache = {"x": x, "rowmax": rowmax}
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """Route ``dout`` ``(N, Ho, Wo, C)`` to the window maxima; ``dx`` ``(N, H, W, C)``."""
        x, rowmax = self._cache["x"], self._cache["rowmax"]
        n, h, w, c = x.shape
        ho, wo = self.pool._out_hw
        ph, pw = self.pool.pool_size
        wc = wo * pw
        d = np.asarray(dout, dtype=x.dtype)
        covers = h == ho * ph and w == wc
        dx = np.empty_like(x) if covers else np.zeros_like(x)
        dcol = self._bufs.get("dcol", (n, ho, wc, c), x.dtype)

        def work(lo: int, hi: int) -> None:
            m = hi - lo
            # columns: route d to the winning column of each window's row-maxima
            r5 = rowmax[lo:hi].reshape(m, ho, wo, pw, c)
            dc5 = dcol[lo:hi].reshape(m, ho, wo, pw, c)
            _route([r5[:, :, :, j] for j in range(pw)], d[lo:hi],
                   [dc5[:, :, :, j] for j in range(pw)])
            # rows: route each column's gradient to the winning row
            xs = x[lo:hi, : ho * ph, :wc]
            g = dx[lo:hi, : ho * ph, :wc]
            if ph == 2 and covers:
                # one multiply with a contiguous output: dx = dcol (repeated) * mask
                x3 = xs.reshape(m * ho, 2, wc * c)
                mask = np.empty((m * ho, 2, wc * c), dtype=bool)
                np.greater(x3[:, 1], x3[:, 0], out=mask[:, 1])  # ties: first row wins
                np.logical_not(mask[:, 1], out=mask[:, 0])
                np.multiply(dcol[lo:hi].reshape(m * ho, 1, wc * c), mask,
                            out=g.reshape(m * ho, 2, wc * c))
            else:
                _route([xs[:, i::ph] for i in range(ph)], dcol[lo:hi],
                       [g[:, i::ph] for i in range(ph)])

        parallel_chunks(work, n, min_chunk=_min_chunk(x))
        return dx


def _route(cands: list[np.ndarray], grad: np.ndarray, outs: list[np.ndarray]) -> None:
    """``outs[k] = grad`` where ``cands[k]`` is the first maximum of the candidates, else 0.

    Masked NumPy writes (``where=``, boolean indexing) are slow on random masks, so
    everything is arithmetic: a winner map updated as ``idx += (k - idx) * (v > best)``
    (uint8, exact modulo 256), then ``outs[k] = grad * (idx == k)``.
    """
    if len(cands) == 2:
        upd = np.greater(cands[1], cands[0])  # strict: ties go to the first
        np.multiply(grad, upd, out=outs[1])
        np.subtract(grad, outs[1], out=outs[0])  # exact: grad - grad or grad - 0
        return
    best = cands[0].copy()
    idx = np.zeros(best.shape, dtype=np.uint8)
    upd = np.empty(best.shape, dtype=bool)
    tmp = np.empty(best.shape, dtype=np.uint8)
    for k, v in enumerate(cands[1:], start=1):
        np.greater(v, best, out=upd)
        np.maximum(best, v, out=best)
        np.subtract(k, idx, out=tmp)
        np.multiply(tmp, upd, out=tmp)
        idx += tmp
    for k, o in enumerate(outs):
        np.equal(idx, k, out=upd)
        np.multiply(grad, upd, out=o)


class ReLUPoolStep:
    """``relu, maxpool2d`` run as ``relu(maxpool(x))``: the ReLU then touches 4x fewer
    values, in place (``relu(maxpool(x)) == maxpool(relu(x))``, and the max-pool backward
    only matters where the ReLU passes a gradient).

    Input ``(N, H, W, C)``, output ``(N, Ho, Wo, C)``.
    """

    kind = "relu_pool"
    size = 2

    def __init__(self, relu: ReLU, pool: MaxPool2D) -> None:
        self.relu = ReLUStep(relu)
        self.pool: Step = pool.fast_step([]) or pool

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Pool, then ReLU in place on the (fresh) pooled output."""
        y = self.pool.forward(x, training)
        np.maximum(y, 0, out=y)
        self.relu._out = y
        return y

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        """``dx`` ``(N, H, W, C)`` from ``dout`` ``(N, Ho, Wo, C)``."""
        return self.pool.backward(self.relu.backward(dout))
