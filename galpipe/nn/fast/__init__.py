"""The opt-in fast path of :mod:`galpipe.nn`: threads, scratch buffers and fused kernels.

Nothing here defines new maths: every kernel computes what the reference layers
compute (outputs and input gradients identical; parameter gradients equal up to
the order of float sums), only faster.  A layer offers a kernel through
:meth:`Layer.fast_step <galpipe.nn.base.Layer.fast_step>`; a
:class:`~galpipe.nn.model.Sequential` asks each of its layers in turn (passing
the layers after it, which a kernel may fuse according to their
:attr:`~galpipe.nn.base.Layer.fusion_tag`) and runs the steps it gets -- the
default; ``model.use_fast_path(False)`` runs the reference layers instead.

Modules:

* :mod:`~galpipe.nn.fast.threads` -- worker threads (``parallel_chunks``,
  ``set_num_workers``), BLAS thread control, scratch-buffer cache;
* :mod:`~galpipe.nn.fast.conv` -- cache-blocked im2col convolution, fused with
  ``relu`` / ``relu`` + 2x2 ``maxpool2d``;
* :mod:`~galpipe.nn.fast.winograd` -- Winograd F(2x2, 3x3) for 3x3 stride-1 'same'
  convolutions with at least 16 input channels (same fusions), chosen by
  ``ConvStep.fuse``; its inference forward runs :mod:`~galpipe.nn.fast.winograd4`
  (F(4x4, 3x3), 4x fewer multiplies than direct) on layers whose size is a multiple of 4;
* :mod:`~galpipe.nn.fast.s2d` -- few-channel 3x3 convolutions (the first layer on RGB
  input) fused with ``relu`` + 2x2 ``maxpool2d``: one GEMM per pooling window over
  space-to-depth patches;
* :mod:`~galpipe.nn.fast.pool` -- separable max pooling, ``relu`` + ``maxpool2d``;
* :mod:`~galpipe.nn.fast.dense`, :mod:`~galpipe.nn.fast.elementwise` -- threaded
  dense layer and ReLU.
"""

from __future__ import annotations

from galpipe.nn.fast.threads import (
    compute_region,
    get_num_workers,
    parallel_chunks,
    set_num_workers,
)

__all__ = ["compute_region", "get_num_workers", "parallel_chunks", "set_num_workers"]
