"""Threaded dense layer (results identical for any number of workers)."""

from __future__ import annotations

import numpy as np

from galpipe.errors import ModelError
from galpipe.nn.dense import Dense
from galpipe.nn.fast.threads import parallel_chunks


def _min_rows(work_per_row: int) -> int:
    """Smallest chunk (rows) worth a thread: about 2**17 multiply-adds."""
    return max(1, (1 << 17) // max(work_per_row, 1))


class DenseStep:
    """:class:`~galpipe.nn.dense.Dense` split over worker threads.

    The forward pass splits the batch rows; the backward pass splits the input
    features (disjoint rows of ``dW`` and columns of ``dx``, each computed as in one
    GEMM).  Input ``(N, F_in)``, output ``(N, F_out)``.
    """

    kind = "dense"
    size = 1

    def __init__(self, dense: Dense) -> None:
        self.dense = dense
        self._x: np.ndarray | None = None

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """``x @ W + b``."""
        layer = self.dense
        layer._check_input(x)
        w = layer.params["W"].astype(x.dtype, copy=False)
        b = layer.params["b"].astype(x.dtype, copy=False) if layer.use_bias else None
        out = np.empty((x.shape[0], layer.units), dtype=x.dtype)

        def work(lo: int, hi: int) -> None:
            np.matmul(x[lo:hi], w, out=out[lo:hi])
            if b is not None:
                out[lo:hi] += b

        parallel_chunks(work, x.shape[0], min_chunk=_min_rows(w.size))
        self._x = x
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        """Fill ``grads``; return ``dx`` ``(N, F_in)`` (None if not needed)."""
        if self._x is None:
            raise ModelError("dense: backward called before forward")
        layer, x = self.dense, self._x
        dout = np.ascontiguousarray(dout, dtype=x.dtype)
        gw = layer.grads["W"]
        w = layer.params["W"].astype(x.dtype, copy=False)
        dx = np.empty_like(x) if layer.input_grad_needed else None

        def work(lo: int, hi: int) -> None:
            if gw.dtype == x.dtype:
                np.matmul(x[:, lo:hi].T, dout, out=gw[lo:hi])
            else:
                gw[lo:hi] = x[:, lo:hi].T @ dout
            if dx is not None:
                np.matmul(dout, w[lo:hi].T, out=dx[:, lo:hi])

        parallel_chunks(work, x.shape[1], min_chunk=_min_rows(x.shape[0] * layer.units))
        if layer.use_bias:
            layer.grads["b"][...] = dout.sum(axis=0)
        return dx
