"""Mini-batch training with validation, early stopping and exact resume.

:func:`fit` trains a :class:`galpipe.nn.model.Sequential` on a streamed
dataset (:mod:`galpipe.nn.data`).  Every random stream is derived from the
config seed and the epoch number (:func:`galpipe.nn.data.epoch_rng`):

==================  =============================================
stream              generator
==================  =============================================
shuffling           ``epoch_rng(seed, epoch, STREAM_SHUFFLE)``
augmentation        ``epoch_rng(seed, epoch, STREAM_AUGMENT)``
dropout masks       ``epoch_rng(seed, epoch, STREAM_DROPOUT)``
==================  =============================================

(weight initialisation is seeded when the model is built).  Hence the random
state at the start of epoch ``e`` is a function of ``(seed, e)`` alone, and a
run resumed from the checkpoint written after epoch ``e - 1`` replays exactly
the same computations as an uninterrupted run: the final weights are
bit-identical.

Checkpoint layout (``checkpoint_dir``), rewritten after every epoch:

* ``checkpoint-eNNNN.npz`` (``NNNN`` = completed epochs): arrays only, readable
  with ``allow_pickle=False``: ``param/<name>``, ``buffer/<name>`` (current
  weights and BatchNorm statistics), ``best_param/<name>``,
  ``best_buffer/<name>`` (weights of the best epoch so far) and ``opt/<key>``
  (optimizer state arrays).
* ``checkpoint.json``: the commit record, written atomically *after* the npz:
  format version, completed epochs, global step, npz file name and its SHA-256,
  the training config, the model config, the history, best epoch/metric, the
  early-stopping counter, whether training finished, the RNG derivation
  (seed; streams are re-derived per epoch so no generator state needs saving)
  and the non-array part of the optimizer state.  Older npz files are deleted
  once the new record is in place, so a crash at any point leaves a consistent
  pair.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from galpipe.errors import ConfigError, DataError, ModelError
from galpipe.io.atomic import atomic_path, atomic_write_text
from galpipe.nn.arrays import assign_arrays, read_npz
from galpipe.nn.augment import RenderSpec, random_augment, random_render
from galpipe.nn.data import STREAM_AUGMENT, STREAM_DROPOUT, Dataset, epoch_rng
from galpipe.nn.losses import SoftmaxCrossEntropy, log_softmax
from galpipe.nn.optim import clip_grad_norm, flatten_parameters, make_optimizer
from galpipe.nn.schedules import make_schedule

logger = logging.getLogger(__name__)

CHECKPOINT_JSON = "checkpoint.json"
CHECKPOINT_FORMAT = "galpipe-train-checkpoint"
CHECKPOINT_VERSION = 1



# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`fit`: the config's ``training:`` section plus the run's seed.

    The fields are exactly the schema's ``training`` keys (``$defs/training`` in
    ``galpipe/schemas/config.schema.yaml``, which gives each one's meaning, range
    and default) and ``seed``.  There are no defaults here: build it with
    :meth:`from_dict`, which validates a (partial) mapping against the schema and
    fills the schema's defaults, so a library caller and the pipeline get the
    same values for the same keys.

    Attributes
    ----------
    epochs, batch_size, optimizer, lr, momentum, nesterov, weight_decay
        Passes over the training set, mini-batch size, optimiser and its settings
        (``momentum``/``nesterov`` are used by ``sgd`` only).
    schedule : mapping
        Learning-rate schedule: ``type`` (constant | step | cosine),
        ``warmup_epochs``, ``step_size``, ``gamma``, ``min_lr``.
    grad_clip : float or None
        Global gradient-norm clip (None: none).
    label_smoothing : float
        Label smoothing of the training loss.
    class_weighting : str
        ``"none"`` or ``"balanced"``: weight class ``k`` by ``N / (K * n_k)``
        (training and validation loss).
    augment, max_shift
        Random D4 symmetry and shifts up to ``max_shift`` pixels per training image.
    rendering : mapping
        Random changes of how an image was made (zoom, blur, noise, stretch, JPEG):
        :class:`galpipe.nn.augment.RenderSpec`; all off by default.
    init_from : str or None
        A model (shipped name or folder) whose matching weights start the training
        (copied by the train stage, :func:`galpipe.stages.train.init_weights`).
    freeze : int
        Leading layers whose parameters stay fixed (evaluation mode: batch statistics frozen too).
    early_stopping_patience : int
        Epochs without improvement of ``early_stopping_metric`` (by more than
        ``min_delta``) before stopping; 0 never stops early.  The best epoch's
        weights are restored at the end in any case.
    early_stopping_metric, min_delta
        ``"val_loss"`` or ``"val_balanced_acc"``; smallest improvement that counts.
    shuffle_buffer, eval_batch_size
        Rows in the streaming shuffle buffer; batch size of validation passes.
    seed : int
        Seed of every random stream (shuffling, augmentation, dropout).
    """

    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    schedule: Mapping[str, Any]
    grad_clip: float | None
    label_smoothing: float
    class_weighting: str
    augment: bool
    max_shift: int
    rendering: Mapping[str, Any]
    init_from: str | None
    freeze: int
    early_stopping_patience: int
    early_stopping_metric: str
    min_delta: float
    shuffle_buffer: int
    eval_batch_size: int
    seed: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None = None, *, where: str = "training") -> TrainConfig:
        """Validate a (partial) ``training`` mapping, plus an optional ``seed``, against the schema.

        Missing keys take the schema's defaults (the run's ``seed`` too).

        Raises
        ------
        ConfigError
            An unknown key or a bad value, naming ``<where>.<key>``.
        """
        from galpipe.config import validate_config

        d = dict(d or {})
        top = {"seed": d.pop("seed")} if "seed" in d else {}
        try:
            full = validate_config({"training": d, **top})
        except ConfigError as exc:
            msg = str(exc)
            raise ConfigError(msg.replace("'training", f"'{where}", 1) if "'training" in msg
                              else f"{where}: {msg}") from exc
        return cls(**full["training"], seed=int(full["seed"]))

    @property
    def optimizer_kwargs(self) -> dict[str, Any]:
        """Settings of the chosen optimiser besides ``lr`` and ``weight_decay``."""
        return {"momentum": self.momentum, "nesterov": self.nesterov} if self.optimizer == "sgd" else {}

    @property
    def schedule_spec(self) -> dict[str, Any]:
        """The schedule keys that its ``type`` uses (for :func:`galpipe.nn.schedules.make_schedule`)."""
        from galpipe.nn.schedules import schedule_keys

        return {k: v for k, v in self.schedule.items() if k in schedule_keys(self.schedule["type"])}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy (round-trips through :meth:`from_dict`)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["schedule"] = dict(self.schedule)
        out["rendering"] = dict(self.rendering)
        return copy.deepcopy(out)


# --------------------------------------------------------------------------- history
_HISTORY_COLUMNS = (
    "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc", "lr",
    "seconds",
)


@dataclass
class History:
    """Per-epoch training record (one entry per completed epoch).

    Attributes
    ----------
    epoch : list of int
        Epoch numbers, starting at 1.
    train_loss, train_acc : list of float
        Mean training loss (as optimised: smoothing and class weights
        included) and accuracy over the epoch's (augmented) batches.
    val_loss, val_acc, val_balanced_acc : list of float
        Validation metrics at the end of the epoch (NaN without validation set).
    lr : list of float
        Learning rate of the epoch's first step.
    seconds : list of float
        Wall-clock duration of the epoch (training + validation).
    best_epoch : int
        Epoch whose weights were kept (0 before any epoch).
    stopped_early : bool
        Whether early stopping ended the run.
    class_weights : list of float or None
        Class weights used (None for ``class_weighting="none"``).
    """

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    val_balanced_acc: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    class_weights: list[float] | None = None

    def __len__(self) -> int:
        return len(self.epoch)

    def append(self, **row: float) -> None:
        """Add one epoch; ``row`` has one value per column."""
        for key in _HISTORY_COLUMNS:
            getattr(self, key).append(row[key])

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (NaN is written as ``null``)."""

        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            return v

        out: dict[str, Any] = {k: [clean(v) for v in getattr(self, k)] for k in _HISTORY_COLUMNS}
        out["best_epoch"] = self.best_epoch
        out["stopped_early"] = self.stopped_early
        out["class_weights"] = self.class_weights
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        """Inverse of :meth:`to_dict`."""
        h = cls(best_epoch=int(d.get("best_epoch", 0)), stopped_early=bool(d.get("stopped_early")),
                class_weights=d.get("class_weights"))
        for key in _HISTORY_COLUMNS:
            vals = d.get(key, [])
            if key == "epoch":
                h.epoch = [int(v) for v in vals]
            else:
                setattr(h, key, [math.nan if v is None else float(v) for v in vals])
        return h

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write one row per epoch (header: the column names) atomically."""
        lines = [",".join(_HISTORY_COLUMNS)]
        for i in range(len(self)):
            row = [str(self.epoch[i])] + [repr(float(getattr(self, k)[i]))
                                          for k in _HISTORY_COLUMNS[1:]]
            lines.append(",".join(row))
        return atomic_write_text(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------- metrics
def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (shape ``(N,)`` each).

    Returns NaN for an empty ``y_true``.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.size == 0:
        return math.nan
    support = np.bincount(y_true, minlength=n_classes)
    hits = np.bincount(y_true[y_true == y_pred], minlength=n_classes)
    present = support > 0
    return float(np.mean(hits[present] / support[present]))


def class_weights_from_counts(counts: np.ndarray) -> np.ndarray:
    """Balanced class weights ``N / (K * n_k)``, shape ``(K,)`` float64.

    ``K`` counts all classes; a class with ``n_k = 0`` gets weight 1.
    """
    counts = np.asarray(counts, dtype=np.float64)
    k = counts.size
    total = counts.sum()
    with np.errstate(divide="ignore"):
        w = np.where(counts > 0, total / (k * np.maximum(counts, 1)), 1.0)
    return w


def evaluate(
    model: Any,
    ds: Dataset,
    *,
    batch_size: int = 256,
    class_weights: np.ndarray | None = None,
) -> dict[str, float]:
    """Loss and accuracies of ``model`` (inference mode) on a whole dataset.

    Parameters
    ----------
    model : Sequential
        Maps ``(B, *ds.image_shape)`` to logits ``(B, K)``.
    ds : ParquetImageDataset or ArrayDataset
        Read in file order.
    batch_size : int
        Rows per forward pass.
    class_weights : numpy.ndarray, optional
        Shape ``(K,)``; the loss is the weighted mean ``sum w_y nll / sum w_y``.

    Returns
    -------
    dict
        ``loss`` (mean cross-entropy, no label smoothing), ``acc``,
        ``balanced_acc`` and ``n`` (rows).
    """
    n_classes = int(model.output_shape[-1])
    total = wsum = 0.0
    y_all: list[np.ndarray] = []
    p_all: list[np.ndarray] = []
    for xb, yb in ds.iter_batches(batch_size, shuffle=False):
        logits = model.forward(xb, training=False)
        logp = log_softmax(np.asarray(logits, dtype=np.float64))
        nll = -logp[np.arange(len(yb)), yb]
        w = np.ones(len(yb)) if class_weights is None else np.asarray(class_weights)[yb]
        total += float(np.sum(w * nll))
        wsum += float(np.sum(w))
        y_all.append(yb)
        p_all.append(np.argmax(logits, axis=-1))
    if not y_all:
        return {"loss": math.nan, "acc": math.nan, "balanced_acc": math.nan, "n": 0}
    y = np.concatenate(y_all)
    pred = np.concatenate(p_all)
    return {
        "loss": total / wsum if wsum > 0 else math.nan,
        "acc": float(np.mean(pred == y)),
        "balanced_acc": balanced_accuracy(y, pred, n_classes),
        "n": len(y),
    }


# --------------------------------------------------------------------------- state (de)flattening
def _split_state(obj: Any, prefix: str, arrays: dict[str, np.ndarray]) -> Any:
    """JSON skeleton of a nested state; arrays (and numpy scalars) go to ``arrays``."""
    if isinstance(obj, np.ndarray | np.generic) and not isinstance(obj, np.bool_):
        key = f"opt/{prefix}" if prefix else "opt/_"
        arrays[key] = np.asarray(obj)
        return {"__array__": key, "scalar": isinstance(obj, np.generic)}
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _split_state(v, f"{prefix}/{k}", arrays)
                                 for k, v in obj.items()}}
        return {"__items__": [[_split_state(k, f"{prefix}/k{i}", arrays),
                               _split_state(v, f"{prefix}/v{i}", arrays)]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, list | tuple):
        tag = "__tuple__" if isinstance(obj, tuple) else "__list__"
        return {tag: [_split_state(v, f"{prefix}/{i}", arrays) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return {"__float__": repr(obj)}  # exact, and survives NaN/inf
    raise ModelError(f"optimizer state entry {prefix!r} has unsupported type {type(obj).__name__}")


def _join_state(skel: Any, arrays: Any) -> Any:
    """Inverse of :func:`_split_state`."""
    if isinstance(skel, dict):
        if "__array__" in skel:
            arr = np.array(arrays[skel["__array__"]])
            return arr[()] if skel.get("scalar") else arr
        if "__dict__" in skel:
            return {k: _join_state(v, arrays) for k, v in skel["__dict__"].items()}
        if "__items__" in skel:
            return {_join_state(k, arrays): _join_state(v, arrays) for k, v in skel["__items__"]}
        if "__tuple__" in skel:
            return tuple(_join_state(v, arrays) for v in skel["__tuple__"])
        if "__list__" in skel:
            return [_join_state(v, arrays) for v in skel["__list__"]]
        if "__float__" in skel:
            return float(skel["__float__"])
    return skel


def _json_roundtrip(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


# --------------------------------------------------------------------------- checkpoints
@dataclass
class _RunState:
    epochs_done: int = 0
    step: int = 0
    bad_epochs: int = 0
    best_metric: float | None = None
    best_params: dict[str, np.ndarray] | None = None
    best_buffers: dict[str, np.ndarray] | None = None
    finished: bool = False
    history: History = field(default_factory=History)


def _snapshot(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in arrays.items()}


def _write_checkpoint(
    directory: Path, model: Any, optimizer: Any, cfg: TrainConfig, st: _RunState
) -> None:
    arrays: dict[str, np.ndarray] = {}
    for k, v in model.params.items():
        arrays[f"param/{k}"] = v
    for k, v in model.state.items():
        arrays[f"buffer/{k}"] = v
    for k, v in (st.best_params or {}).items():
        arrays[f"best_param/{k}"] = v
    for k, v in (st.best_buffers or {}).items():
        arrays[f"best_buffer/{k}"] = v
    opt_skeleton = _split_state(optimizer.state_dict(), "", arrays)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    npz_name = f"checkpoint-e{st.epochs_done:04d}.npz"
    with atomic_path(directory / npz_name) as tmp:
        tmp.write_bytes(data)
    record = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "epochs_done": st.epochs_done,
        "step": st.step,
        "npz": npz_name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "config": cfg.to_dict(),
        "model_config": _json_roundtrip(model.get_config()),
        "history": st.history.to_dict(),
        "best_metric": None if st.best_metric is None else repr(st.best_metric),
        "has_best": st.best_params is not None,
        "bad_epochs": st.bad_epochs,
        "finished": st.finished,
        "rng": {"seed": cfg.seed, "derivation": "numpy default_rng([seed, epoch, stream])"},
        "optimizer": opt_skeleton,
    }
    atomic_write_text(directory / CHECKPOINT_JSON, json.dumps(record, indent=1) + "\n")
    for old in directory.glob("checkpoint-e*.npz"):
        if old.name != npz_name:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()


def has_checkpoint(directory: str | os.PathLike[str] | None) -> bool:
    """Whether ``directory`` holds a training checkpoint record."""
    return directory is not None and (Path(directory) / CHECKPOINT_JSON).is_file()


def _read_checkpoint(
    directory: Path, model: Any, optimizer: Any, cfg: TrainConfig
) -> _RunState:
    jpath = directory / CHECKPOINT_JSON
    try:
        record = json.loads(jpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"checkpoint {jpath}: not readable JSON ({exc})") from exc
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"checkpoint {jpath}: not a galpipe training checkpoint")
    if record.get("version") != CHECKPOINT_VERSION:
        raise DataError(
            f"checkpoint {jpath}: version {record.get('version')!r}, expected {CHECKPOINT_VERSION}"
        )
    saved_cfg = record["config"]
    if saved_cfg != _json_roundtrip(cfg.to_dict()):
        diff = sorted(k for k in set(saved_cfg) | set(cfg.to_dict())
                      if saved_cfg.get(k) != _json_roundtrip(cfg.to_dict()).get(k))
        raise ConfigError(
            f"checkpoint {jpath} was written with a different training config (keys {diff} "
            "differ); use a fresh checkpoint directory or the original config"
        )
    if record["model_config"] != _json_roundtrip(model.get_config()):
        raise ModelError(
            f"checkpoint {jpath} was written for a different model architecture; use a fresh "
            "checkpoint directory or build the original model"
        )
    npath = directory / str(record["npz"])
    try:
        data = npath.read_bytes()
    except OSError as exc:
        raise DataError(f"checkpoint {npath}: cannot read ({exc})") from exc
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise DataError(f"checkpoint {npath}: SHA-256 does not match {jpath} (corrupt file)")
    arrays = read_npz(data, where=f"checkpoint {npath}")

    def group(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

    assign_arrays(model.params, group("param/"), where=f"checkpoint {npath} (parameters)")
    assign_arrays(model.state, group("buffer/"), where=f"checkpoint {npath} (buffers)")
    optimizer.load_state_dict(_join_state(record["optimizer"], arrays))
    st = _RunState(
        epochs_done=int(record["epochs_done"]),
        step=int(record["step"]),
        bad_epochs=int(record["bad_epochs"]),
        best_metric=None if record["best_metric"] is None else float(record["best_metric"]),
        finished=bool(record["finished"]),
        history=History.from_dict(record["history"]),
    )
    if record["has_best"]:
        st.best_params = group("best_param/")
        st.best_buffers = group("best_buffer/")
    return st


# --------------------------------------------------------------------------- fit
def _check_compat(model: Any, train_ds: Dataset, val_ds: Dataset | None) -> int:
    n_classes = int(model.output_shape[-1])
    for name, ds in (("training", train_ds), ("validation", val_ds)):
        if ds is None:
            continue
        if tuple(ds.image_shape) != tuple(model.input_shape):
            raise DataError(
                f"{name} set {ds!r}: inputs of shape {tuple(ds.image_shape)}, but the model "
                f"expects {tuple(model.input_shape)}"
            )
        if ds.n_classes != n_classes:
            raise ModelError(
                f"the model outputs {n_classes} classes but the {name} set has "
                f"{ds.n_classes} ({ds.classes})"
            )
    if train_ds.n_rows == 0:
        raise DataError(f"training set {train_ds!r} is empty")
    return n_classes


def _improved(metric: str, value: float, best: float | None, min_delta: float) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    if metric == "val_loss":
        return value < best - min_delta
    return value > best + min_delta


def _progress_enabled(progress: bool) -> bool:
    if not progress:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def fit(
    model: Any,
    train_ds: Dataset,
    val_ds: Dataset | None,
    cfg: TrainConfig | dict[str, Any],
    checkpoint_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    display: bool = False,
) -> History:
    """Train ``model`` in place; return the per-epoch history.

    Each epoch: streamed shuffled mini-batches (seeded by ``(seed, epoch)``),
    optional augmentation, forward, loss, backward, optional gradient-norm
    clipping and an optimizer step at the scheduled learning rate; then a
    validation pass (loss, accuracy, balanced accuracy), early-stopping
    bookkeeping, a checkpoint (when ``checkpoint_dir``) and a log line.  At the
    end the weights (and BatchNorm statistics) of the best validation epoch are
    restored; without a validation set the final weights are kept.

    Parameters
    ----------
    model : Sequential
        Built model mapping ``(B, *image_shape)`` to logits ``(B, K)``.
    train_ds, val_ds : ParquetImageDataset or ArrayDataset
        Training and validation data (``val_ds`` may be None).
    cfg : TrainConfig or dict
        Hyper-parameters (a dict goes through :meth:`TrainConfig.from_dict`).
    checkpoint_dir : path-like, optional
        Where to checkpoint after every epoch.  If it already holds a
        checkpoint of the same config and architecture, training resumes after
        the last completed epoch and ends bit-identical to an uninterrupted
        run; a finished run is returned as is (best weights loaded).
    progress : bool
        Show a tqdm progress bar with the running loss and accuracy (only when
        stderr is a terminal).
    log : callable, optional
        Receives one summary line per epoch (default: ``logging`` at INFO).
    display : bool
        The images are 8-bit display values in 0..1 (JPEG/PNG): the rendering changes
        clip to 0..1 and may re-compress as JPEG (``cfg.rendering``).

    Returns
    -------
    History

    Raises
    ------
    ConfigError, DataError, ModelError
        Bad config, incompatible data/model/checkpoint, or a non-finite loss.
    """
    if not isinstance(cfg, TrainConfig):
        cfg = TrainConfig.from_dict(cfg)
    emit = log if log is not None else logger.info
    _check_compat(model, train_ds, val_ds)
    run = _setup(model, train_ds, cfg, emit, display)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and has_checkpoint(ckpt):
        st = _read_checkpoint(ckpt, model, run.optimizer, cfg)
        emit(f"resuming from {ckpt / CHECKPOINT_JSON} after epoch {st.epochs_done}")
    else:
        st = _RunState()
    st.history.class_weights = (None if run.class_weights is None
                                else [float(w) for w in run.class_weights])
    while not st.finished and st.epochs_done < cfg.epochs:
        t0 = time.perf_counter()
        epoch = st.epochs_done
        train = _train_epoch(model, train_ds, cfg, run, st, progress)
        if val_ds is not None:
            val = evaluate(model, val_ds, batch_size=cfg.eval_batch_size,
                           class_weights=run.class_weights)
        else:
            val = {"loss": math.nan, "acc": math.nan, "balanced_acc": math.nan}
        st.epochs_done = epoch + 1
        st.history.append(**train, val_loss=val["loss"], val_acc=val["acc"],
                          val_balanced_acc=val["balanced_acc"], seconds=0.0)
        _track_best(model, cfg, st, val if val_ds is not None else None)
        st.history.seconds[-1] = time.perf_counter() - t0
        if ckpt is not None:
            _write_checkpoint(ckpt, model, run.optimizer, cfg, st)
        emit(_epoch_line(st.history, cfg.epochs))
    if st.best_params is not None:
        assign_arrays(model.params, st.best_params, where="best-epoch parameters")
        assign_arrays(model.state, st.best_buffers or {}, where="best-epoch buffers")
    if cfg.freeze:
        model.freeze(0)
    return st.history


@dataclass
class _Setup:
    """What :func:`fit` derives from the config once: loss, optimizer and schedule."""

    loss_fn: SoftmaxCrossEntropy
    optimizer: Any
    schedule: Callable[[int], float]
    steps_per_epoch: int
    class_weights: np.ndarray | None
    render: RenderSpec
    display: bool


def _setup(model: Any, train_ds: Dataset, cfg: TrainConfig, emit: Callable[[str], None],
           display: bool = False) -> _Setup:
    """Class weights, loss, optimizer (on the trainable ``model.params``), learning-rate
    schedule and the rendering changes; ``cfg.freeze`` leading layers are frozen."""
    weights: np.ndarray | None = None
    if cfg.class_weighting == "balanced":
        counts = np.bincount(train_ds.labels(), minlength=int(model.output_shape[-1]))
        weights = class_weights_from_counts(counts)
        if np.any(counts == 0):
            emit(f"warning: classes {np.flatnonzero(counts == 0).tolist()} have no training rows")
    loss_fn = SoftmaxCrossEntropy(class_weights=weights, label_smoothing=cfg.label_smoothing)
    opt_kwargs = {**cfg.optimizer_kwargs, "weight_decay": cfg.weight_decay}
    # one flat buffer for the parameters and one for the gradients (values kept): the
    # optimiser then updates the whole model with a few ufunc calls
    flatten_parameters(model)
    params = model.params
    if cfg.freeze:
        n_layers = len(getattr(model, "layers", ()))
        if cfg.freeze >= n_layers:
            raise ConfigError(f"training.freeze: {cfg.freeze} would freeze every layer of the {n_layers}-layer "
                              f"network (output layer included); at most {n_layers - 1}")
        model.freeze(cfg.freeze)
        frozen = set(model.frozen_keys())
        params = {k: v for k, v in params.items() if k not in frozen}
        if not params:
            raise ConfigError(f"training.freeze: the first {cfg.freeze} layers hold every parameter")
        emit(f"freezing the first {cfg.freeze} layers ({sum(model.params[k].size for k in frozen):,} parameters); "
             f"training {sum(p.size for p in params.values()):,}")
    render = RenderSpec.from_dict(cfg.rendering)
    if render.jpeg_quality is not None and not display:
        raise ConfigError("training.rendering.jpeg_quality: the training images are not 8-bit display images "
                          "(JPEG/PNG); JPEG re-compression applies to those only")
    try:
        optimizer = make_optimizer(cfg.optimizer, params, lr=cfg.lr, **opt_kwargs)
    except ModelError as exc:
        raise ConfigError(f"training config: optimizer_kwargs: {exc}") from exc
    steps_per_epoch = math.ceil(train_ds.n_rows / cfg.batch_size)
    schedule = make_schedule(cfg.schedule_spec, cfg.lr, cfg.epochs * steps_per_epoch, steps_per_epoch)
    return _Setup(loss_fn, optimizer, schedule, steps_per_epoch, weights, render, display)


def _train_epoch(model: Any, train_ds: Dataset, cfg: TrainConfig, run: _Setup, st: _RunState,
                 progress: bool) -> dict[str, float]:
    """One pass over the shuffled training set (epoch ``st.epochs_done``).

    Returns the history columns ``epoch``, ``train_loss``, ``train_acc`` and ``lr``
    (the learning rate of the epoch's first step); ``st.step`` advances.
    """
    epoch = st.epochs_done
    model.set_rng(epoch_rng(cfg.seed, epoch, STREAM_DROPOUT))
    aug_rng = epoch_rng(cfg.seed, epoch, STREAM_AUGMENT)
    first_lr = float(run.schedule(st.step))
    loss_sum = 0.0
    correct = seen = 0
    bar = tqdm(total=run.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
               disable=not _progress_enabled(progress), unit="batch")
    try:
        for xb, yb in train_ds.iter_batches(
            cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
            buffer_size=cfg.shuffle_buffer,
        ):
            if run.render.enabled:
                xb = random_render(xb, aug_rng, run.render, display=run.display)
            if cfg.augment:
                xb = random_augment(xb, aug_rng, max_shift=cfg.max_shift)
            loss, logits = _train_step(model, xb, yb, cfg, run, st)
            loss_sum += loss * len(yb)
            correct += int(np.sum(np.argmax(logits, axis=-1) == yb))
            seen += len(yb)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}",
                            refresh=False)
    finally:
        bar.close()
    return {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
            "lr": first_lr}


def _train_step(model: Any, xb: np.ndarray, yb: np.ndarray, cfg: TrainConfig, run: _Setup,
                st: _RunState) -> tuple[float, np.ndarray]:
    """Forward, loss, backward, clipping and optimizer step on one batch ``xb`` ``(B, ...)``.

    Returns the loss and the logits ``(B, K)``; ``st.step`` advances.
    """
    lr = float(run.schedule(st.step))
    logits = model.forward(xb, training=True)
    loss = float(run.loss_fn.forward(logits, yb))
    if not math.isfinite(loss):
        raise ModelError(
            f"training diverged: loss is {loss} at epoch {st.epochs_done + 1}, step "
            f"{st.step} (lr={lr:g}); lower the learning rate or set grad_clip"
        )
    model.backward(run.loss_fn.backward(), input_grad=False)
    grads = model.grads
    if cfg.grad_clip is not None:
        clip_grad_norm(grads, cfg.grad_clip)
    run.optimizer.step(grads, lr=lr)
    st.step += 1
    return loss, logits


def _track_best(model: Any, cfg: TrainConfig, st: _RunState, val: dict[str, float] | None
                ) -> None:
    """Early-stopping bookkeeping after epoch ``st.epochs_done``: keep the best weights,
    count epochs without improvement, mark the run finished."""
    epoch = st.epochs_done
    patience = cfg.early_stopping_patience or 0
    if val is not None:
        metric = cfg.early_stopping_metric
        value = val["loss"] if metric == "val_loss" else val["balanced_acc"]
        if _improved(metric, value, st.best_metric, cfg.min_delta):
            st.best_metric = value
            st.best_params = _snapshot(model.params)
            st.best_buffers = _snapshot(model.state)
            st.history.best_epoch = epoch
            st.bad_epochs = 0
        else:
            st.bad_epochs += 1
            if patience and st.bad_epochs >= patience:
                st.finished = True
                st.history.stopped_early = True
    else:
        st.history.best_epoch = epoch
    if st.epochs_done >= cfg.epochs:
        st.finished = True


def _epoch_line(h: History, epochs: int) -> str:
    """The log line of the last epoch of ``h``."""
    return (
        f"epoch {h.epoch[-1]}/{epochs}: loss {h.train_loss[-1]:.4f} acc "
        f"{h.train_acc[-1]:.3f} | val loss {h.val_loss[-1]:.4f} acc {h.val_acc[-1]:.3f} "
        f"bal {h.val_balanced_acc[-1]:.3f} | lr {h.lr[-1]:.3g} | "
        f"{h.seconds[-1]:.1f}s" + (" | early stop" if h.stopped_early else "")
    )
