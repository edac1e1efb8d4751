"""galpipe.nn: a small convolutional-network library written from scratch on NumPy.

Channels-last ``(N, H, W, C)`` float32 batches; layers are built from YAML-style
specs (:func:`build_model`), trained with the optimisers in :mod:`galpipe.nn.optim`
(or :func:`galpipe.nn.training.fit`) and saved without pickle
(:mod:`galpipe.nn.persist`: ``model.json`` + ``weights.npz``).

Core and fast path
------------------
The *core* modules hold the maths alone, one readable reference implementation
per layer (forward and backward on whole batches): :mod:`~galpipe.nn.conv`
(im2col convolution), :mod:`~galpipe.nn.pooling`, :mod:`~galpipe.nn.dense`
(dense, flatten, dropout), :mod:`~galpipe.nn.norm`, :mod:`~galpipe.nn.activations`;
:mod:`~galpipe.nn.base` defines the layer protocol (``forward(x, training)``,
``backward(dout)``, ``params``/``grads``/``state`` dicts) and the registry;
:mod:`~galpipe.nn.model` the containers.

The *fast path*, :mod:`galpipe.nn.fast`, holds what makes it fast on a CPU:
cache-sized pieces, scratch buffers, worker threads (``set_num_workers``) and
fused ``conv2d + relu (+ 2x2 maxpool2d)`` kernels.  A layer opts in by returning
a step from :meth:`Layer.fast_step` (given the layers after it, recognised by the
``fusion_tag`` they declare); :class:`Sequential` runs those steps by default,
and the reference layers after ``model.use_fast_path(False)``.  Fast and
reference agree to float32 rounding (``tests/test_nn_fast.py``).

Adding a layer
--------------
One file (anywhere) and its test::

    from galpipe.nn import Layer, register

    @register("scaled_swish")          # the YAML ``type``
    class ScaledSwish(Layer):
        def __init__(self, beta: float = 1.0, name: str | None = None) -> None:
            super().__init__(name)     # constructor arguments become the config
            self.beta = beta
        def _build(self, input_shape, rng):    # per-sample shape, no batch axis
            self.params = {"beta": np.full(input_shape[-1], self.beta, self.dtype)}
            return input_shape                 # the output shape
        def forward(self, x, training=False): ...   # cache what backward needs
        def backward(self, dout): ...               # fill self.grads, return dx
        def flops(self): ...                        # optional, for the summary

Specs, ``get_config`` (from the ``__init__`` signature), the summary, saving and
loading, optimisers and :func:`check_layer_gradients` then work from the
registry; ``tests/test_nn_extension.py`` is the worked example.  Optionally add
a fast step in :mod:`galpipe.nn.fast` and a case in ``tests/test_nn_fast.py``.
"""

from __future__ import annotations

from galpipe.nn.base import LAYERS, Layer, LayerProtocol, Step, layer_from_spec, register
from galpipe.nn.fast.threads import get_num_workers, set_num_workers
from galpipe.nn.gradcheck import check_layer_gradients, check_loss_gradients
from galpipe.nn.init import INITIALISERS, glorot_normal, glorot_uniform, he_normal, he_uniform
from galpipe.nn.layers import (
    ELU,
    GELU,
    AvgPool2D,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool,
    LeakyReLU,
    MaxPool2D,
    ReLU,
    Sigmoid,
    Tanh,
)
from galpipe.nn.losses import SoftmaxCrossEntropy, log_softmax, softmax
from galpipe.nn.model import Residual, Sequential, build_model, expand_spec
from galpipe.nn.optim import (
    SGD,
    Adam,
    AdamW,
    Optimizer,
    clip_grad_norm,
    flatten_parameters,
    make_optimizer,
)
from galpipe.nn.persist import load_model, read_model_info, save_model
from galpipe.nn.schedules import make_schedule
from galpipe.nn.summary import summary, summary_rows

__all__ = [
    "ELU",
    "GELU",
    "INITIALISERS",
    "LAYERS",
    "SGD",
    "Adam",
    "AdamW",
    "AvgPool2D",
    "BatchNorm",
    "Conv2D",
    "Dense",
    "Dropout",
    "Flatten",
    "GlobalAvgPool",
    "Layer",
    "LayerProtocol",
    "LeakyReLU",
    "MaxPool2D",
    "Optimizer",
    "ReLU",
    "Residual",
    "Sequential",
    "Sigmoid",
    "SoftmaxCrossEntropy",
    "Step",
    "Tanh",
    "build_model",
    "check_layer_gradients",
    "check_loss_gradients",
    "clip_grad_norm",
    "expand_spec",
    "flatten_parameters",
    "get_num_workers",
    "glorot_normal",
    "glorot_uniform",
    "he_normal",
    "he_uniform",
    "layer_from_spec",
    "load_model",
    "log_softmax",
    "make_optimizer",
    "make_schedule",
    "read_model_info",
    "register",
    "save_model",
    "set_num_workers",
    "softmax",
    "summary",
    "summary_rows",
]
