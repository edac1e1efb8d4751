"""Threaded element-wise activations (results identical to the reference layers)."""

from __future__ import annotations

import numpy as np

from galpipe.errors import ModelError
from galpipe.nn.activations import ReLU
from galpipe.nn.fast.threads import parallel_chunks

#: Arrays smaller than this many elements per chunk are processed on one thread.
_MIN_PARALLEL = 1 << 17


def _min_chunk(x: np.ndarray) -> int:
    per_sample = max(int(np.prod(x.shape[1:])), 1)
    return max(1, _MIN_PARALLEL // per_sample)


class ReLUStep:
    """:class:`~galpipe.nn.activations.ReLU` with large batches split over worker threads.

    Any input shape ``(N, ...)``; same output shape.
    """

    kind = "relu"
    size = 1

    def __init__(self, relu: ReLU) -> None:
        self.relu = relu
        self._out: np.ndarray | None = None

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """``max(x, 0)``."""
        self.relu._ensure_built(x)
        out = np.empty_like(x)

        def work(lo: int, hi: int) -> None:
            np.maximum(x[lo:hi], 0, out=out[lo:hi])

        parallel_chunks(work, x.shape[0], min_chunk=_min_chunk(x))
        self._out = out
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """``dout * (out > 0)``."""
        out = self._out
        if out is None:
            raise ModelError("relu: backward called before forward")
        dx = np.empty_like(out)

        def work(lo: int, hi: int) -> None:
            np.multiply(dout[lo:hi], out[lo:hi] > 0, out=dx[lo:hi])

        parallel_chunks(work, out.shape[0], min_chunk=_min_chunk(out))
        return dx
