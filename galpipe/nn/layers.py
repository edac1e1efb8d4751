"""All built-in layers (importing this module registers them).

The implementations live in :mod:`galpipe.nn.conv`, :mod:`galpipe.nn.pooling`,
:mod:`galpipe.nn.dense`, :mod:`galpipe.nn.norm` and :mod:`galpipe.nn.activations`;
the containers :class:`~galpipe.nn.model.Sequential` and
:class:`~galpipe.nn.model.Residual` in :mod:`galpipe.nn.model`; their fast kernels
in :mod:`galpipe.nn.fast`.
"""

from __future__ import annotations

from galpipe.nn.activations import ELU, GELU, LeakyReLU, ReLU, Sigmoid, Tanh
from galpipe.nn.conv import Conv2D
from galpipe.nn.dense import Dense, Dropout, Flatten
from galpipe.nn.norm import BatchNorm
from galpipe.nn.pooling import AvgPool2D, GlobalAvgPool, MaxPool2D

__all__ = [
    "ELU",
    "GELU",
    "AvgPool2D",
    "BatchNorm",
    "Conv2D",
    "Dense",
    "Dropout",
    "Flatten",
    "GlobalAvgPool",
    "LeakyReLU",
    "MaxPool2D",
    "ReLU",
    "Sigmoid",
    "Tanh",
]
