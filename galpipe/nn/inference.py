"""Class probabilities with uncertainties: test-time augmentation and MC dropout.

* **TTA** averages the softmax over the 8 symmetries of the square
  (:func:`galpipe.nn.augment.dihedral`); galaxy morphology does not depend on
  orientation, so this removes the orientation noise of a single forward pass.
* **MC dropout** (Gal & Ghahramani 2016) runs ``mc_dropout`` stochastic passes
  with the dropout layers active and every other layer in inference mode
  (BatchNorm keeps using its running statistics); the spread of the passes
  (``std``) and the mutual information between prediction and weights are
  epistemic-uncertainty estimates.
* ``entropy`` is the predictive entropy of the mean probabilities (nats), the
  per-galaxy uncertainty reported downstream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from galpipe.errors import ConfigError, DataError
from galpipe.nn.augment import N_SYMMETRIES, dihedral
from galpipe.nn.data import IMAGE, LABEL, OBJID, STREAM_MC_DROPOUT, ArrayDataset, Dataset
from galpipe.nn.dense import Dropout
from galpipe.nn.losses import softmax


@dataclass
class PredictResult:
    """Predictions for ``N`` inputs and ``K`` classes.

    Attributes
    ----------
    proba : numpy.ndarray
        Mean class probabilities, shape ``(N, K)`` float64 (rows sum to 1).
    std : numpy.ndarray
        Standard deviation of the probabilities over the MC-dropout passes,
        shape ``(N, K)``; zeros when ``mc_dropout == 0``.
    entropy : numpy.ndarray
        Predictive entropy ``-sum_k p_k log p_k`` of ``proba`` (nats), shape ``(N,)``.
    mutual_info : numpy.ndarray
        Mutual information (BALD): ``entropy`` minus the mean entropy of the
        individual MC passes, shape ``(N,)``; zeros without MC dropout.
    objids : numpy.ndarray or None
        Object ids, shape ``(N,)``, when the input was a dataset.
    labels : numpy.ndarray or None
        True ``label_index``, shape ``(N,)``, when the input was a dataset.
    """

    proba: np.ndarray
    std: np.ndarray
    entropy: np.ndarray
    mutual_info: np.ndarray
    objids: np.ndarray | None = None
    labels: np.ndarray | None = None

    @property
    def pred(self) -> np.ndarray:
        """Most probable class per input, shape ``(N,)``."""
        return np.argmax(self.proba, axis=1)

    def __len__(self) -> int:
        return int(self.proba.shape[0])


def entropy(p: np.ndarray) -> np.ndarray:
    """Entropy ``-sum p log p`` over the last axis (nats, ``0 log 0 = 0``)."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -terms.sum(axis=-1)


# --------------------------------------------------------------------------- dropout toggling
def _walk(layer: Any) -> Iterator[Any]:
    yield layer
    for sub in layer.sublayers():
        yield from _walk(sub)


def dropout_layers(model: Any) -> list[Any]:
    """All dropout layers of ``model``, nested containers included, in forward order."""
    return [layer for layer in _walk(model) if isinstance(layer, Dropout)]


@contextlib.contextmanager
def mc_dropout_active(model: Any) -> Iterator[int]:
    """Monte-Carlo dropout mode: every dropout layer draws masks, whatever ``training`` says.

    Inside the context, ``model.forward(x, training=False)`` keeps BatchNorm (and
    every other layer) in inference mode but samples dropout masks: the context
    sets each dropout layer's declared :attr:`~galpipe.nn.dense.Dropout.mc_sampling`
    flag and restores the previous values on exit.  Yields the number of dropout
    layers found.
    """
    layers = dropout_layers(model)
    previous = [layer.mc_sampling for layer in layers]
    try:
        for layer in layers:
            layer.mc_sampling = True
        yield len(layers)
    finally:
        for layer, was in zip(layers, previous, strict=True):
            layer.mc_sampling = was


# --------------------------------------------------------------------------- prediction
def _batches(
    data: np.ndarray | Dataset, batch_size: int
) -> tuple[Iterator[tuple[np.ndarray, ...]], bool]:
    if isinstance(data, np.ndarray):
        if data.ndim < 2:
            raise DataError(f"predict_proba: expected an input batch (N, ...), got {data.shape}")
        ds = ArrayDataset(data, np.zeros(len(data), dtype=np.int64), classes=["?"])
        return ds.iter_batches(batch_size, columns=(IMAGE,)), False
    cols = [IMAGE, LABEL]
    if OBJID in data.column_names:
        cols.append(OBJID)
    return data.iter_batches(batch_size, columns=tuple(cols)), True


def _probs(model: Any, x: np.ndarray, tta: bool) -> np.ndarray:
    """Softmax (TTA-averaged) for one batch, shape ``(B, K)`` float64."""
    def probs(inputs: np.ndarray) -> np.ndarray:
        return softmax(np.asarray(model.forward(inputs, training=False), dtype=np.float64))

    if not tta:
        return probs(x)
    acc = probs(x)
    for k in range(1, N_SYMMETRIES):
        acc += probs(dihedral(x, k))
    return acc / N_SYMMETRIES


def predict_proba(
    model: Any,
    data: np.ndarray | Dataset,
    batch_size: int = 256,
    tta: bool = False,
    mc_dropout: int = 0,
    seed: int = 0,
) -> PredictResult:
    """Class probabilities (and uncertainties) for an array or a whole dataset.

    Parameters
    ----------
    model : Sequential
        Maps ``(B, *input_shape)`` to logits ``(B, K)``.
    data : numpy.ndarray or ParquetImageDataset or ArrayDataset
        Inputs ``(N, *input_shape)``, or a dataset streamed in file order.
    batch_size : int
        Rows per forward pass (results do not depend on it, except for the
        dropout masks drawn when ``mc_dropout > 0``).
    tta : bool
        Average the softmax over the 8 dihedral symmetries (square images).
    mc_dropout : int
        Number of stochastic passes with dropout active (0: deterministic; a
        model without dropout gets one deterministic pass and ``std = 0``).
        The dropout layers are reseeded with ``default_rng([seed,
        STREAM_MC_DROPOUT])``; results are reproducible for a given ``seed``
        and ``batch_size``.
    seed : int
        Seed of the MC-dropout masks.

    Returns
    -------
    PredictResult
        ``proba`` ``(N, K)``, ``std`` ``(N, K)``, ``entropy`` ``(N,)``,
        ``mutual_info`` ``(N,)``; ``objids``/``labels`` for datasets.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(mc_dropout, bool) or not isinstance(mc_dropout, int) or mc_dropout < 0:
        raise ConfigError(f"mc_dropout must be an integer >= 0, got {mc_dropout!r}")
    if isinstance(data, np.ndarray) and tuple(data.shape[1:]) != tuple(model.input_shape):
        raise DataError(
            f"predict_proba: inputs of shape {data.shape[1:]}, model expects "
            f"{tuple(model.input_shape)}"
        )
    if not isinstance(data, np.ndarray) and tuple(data.image_shape) != tuple(model.input_shape):
        raise DataError(
            f"predict_proba: dataset {data!r} has inputs of shape {tuple(data.image_shape)}, "
            f"model expects {tuple(model.input_shape)}"
        )
    if mc_dropout and not any(layer.rate > 0 for layer in dropout_layers(model)):
        mc_dropout = 0  # every pass would be identical: one deterministic pass, std = 0
    batches, is_ds = _batches(data, batch_size)
    means: list[np.ndarray] = []
    stds: list[np.ndarray] = []
    mis: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    ctx = mc_dropout_active(model) if mc_dropout else contextlib.nullcontext(0)
    with ctx:
        if mc_dropout:
            model.set_rng(np.random.default_rng([int(seed), STREAM_MC_DROPOUT]))
        for batch in batches:
            xb = batch[0]
            if is_ds:
                labels.append(batch[1])
                if len(batch) > 2:
                    ids.append(batch[2])
            if mc_dropout:
                passes = np.stack([_probs(model, xb, tta) for _ in range(mc_dropout)])
                mean = passes.mean(axis=0)
                means.append(mean)
                stds.append(passes.std(axis=0))
                mis.append(entropy(mean) - entropy(passes).mean(axis=0))
            else:
                mean = _probs(model, xb, tta)
                means.append(mean)
                stds.append(np.zeros_like(mean))
                mis.append(np.zeros(len(mean)))
    k = int(model.output_shape[-1])
    proba = np.concatenate(means) if means else np.zeros((0, k))
    return PredictResult(
        proba=proba,
        std=np.concatenate(stds) if stds else np.zeros((0, k)),
        entropy=entropy(proba),
        mutual_info=np.maximum(np.concatenate(mis), 0.0) if mis else np.zeros(0),
        objids=np.concatenate(ids) if ids else None,
        labels=np.concatenate(labels) if labels else None,
    )
