"""galpipe.nn: a small convolutional-network library written from scratch on NumPy.

Channels-last ``(N, H, W, C)`` float32 batches; layers are built from YAML-style
specs (:func:`build_model`), trained with the optimisers in :mod:`galpipe.nn.optim`
and saved without pickle (:mod:`galpipe.nn.persist`).
"""

from __future__ import annotations

from galpipe.nn.base import (
    LAYERS,
    Layer,
    get_num_workers,
    layer_from_spec,
    register,
    set_num_workers,
)
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
from galpipe.nn.optim import SGD, Adam, AdamW, Optimizer, clip_grad_norm, make_optimizer
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
    "LeakyReLU",
    "MaxPool2D",
    "Optimizer",
    "ReLU",
    "Residual",
    "Sequential",
    "Sigmoid",
    "SoftmaxCrossEntropy",
    "Tanh",
    "build_model",
    "check_layer_gradients",
    "check_loss_gradients",
    "clip_grad_norm",
    "expand_spec",
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
