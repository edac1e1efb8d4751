"""Optimisers (outside the layers), gradient clipping and the optimiser factory.

Optimisers hold references to the model's *live* parameter arrays
(``model.params``) and update them in place in :meth:`step`.

Weight-decay rule: decay (L2 for :class:`SGD`/:class:`Adam`, decoupled for
:class:`AdamW`) applies only to parameters with ``ndim >= 2`` -- convolution
kernels and dense matrices.  Biases and BatchNorm ``gamma``/``beta`` (1-D) are
never decayed.

``state_dict()`` returns only arrays (scalars as 0-d arrays), so it can be saved
in an ``.npz`` and loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from galpipe.errors import ModelError
from galpipe.nn.arrays import check_arrays
from galpipe.nn.fast.threads import parallel_chunks

#: Parameters with at least this many elements are updated by several workers.
_PARALLEL_MIN = 1 << 17


def decays(param: np.ndarray) -> bool:
    """Whether weight decay applies to ``param`` (kernels and matrices, not biases/norms)."""
    return param.ndim >= 2


def _check_scalar(value: Any, what: str, lo: float = 0.0, lo_open: bool = False,
                  hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ModelError(f"{what} must be a number, got {value!r}")
    v = float(value)
    bad = not math.isfinite(v) or v < lo or (lo_open and v == lo) or (hi is not None and v >= hi)
    if bad:
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'})"
        raise ModelError(f"{what} must be in {rng}, got {value!r}")
    return v


class Optimizer:
    """Base class: parameter bookkeeping, step counter and (de)serialisation."""

    #: Per-parameter state buffers, e.g. ``("m", "v")`` for Adam.
    slots: tuple[str, ...] = ()

    def __init__(self, params: Mapping[str, np.ndarray], lr: float) -> None:
        if not isinstance(params, Mapping) or not params:
            raise ModelError("optimizer: params must be a non-empty dict name -> array")
        for key, p in params.items():
            if not isinstance(p, np.ndarray) or not np.issubdtype(p.dtype, np.floating):
                raise ModelError(f"optimizer: parameter {key!r} is not a float array")
        self.params: dict[str, np.ndarray] = dict(params)
        self.lr = _check_scalar(lr, "optimizer: lr")
        self.t = 0
        #: The one flat buffer every parameter is a view of (see :func:`flatten_parameters`),
        #: or None: then parameters are updated one by one.
        self.flat: np.ndarray | None = flat_buffer(self.params)
        self.buffers: dict[str, dict[str, np.ndarray]] = {}
        self._flat_buffers: dict[str, np.ndarray] = {}
        for slot in self.slots:
            if self.flat is not None:
                self._flat_buffers[slot] = np.zeros_like(self.flat)
                self.buffers[slot] = _views(self._flat_buffers[slot], self.params)
            else:
                self.buffers[slot] = {k: np.zeros_like(p) for k, p in self.params.items()}
        self._segments = [] if self.flat is None else _segments(self.params)

    def _grads_for(self, grads: Mapping[str, np.ndarray]) -> None:
        missing = [k for k in self.params if k not in grads]
        if missing:
            raise ModelError(f"optimizer.step: gradients missing for parameters {missing}")
        for k, p in self.params.items():
            if grads[k].shape != p.shape:
                raise ModelError(
                    f"optimizer.step: gradient of {k!r} has shape {grads[k].shape}, "
                    f"parameter has {p.shape}"
                )

    def step(self, grads: Mapping[str, np.ndarray], lr: float | None = None) -> None:
        """Update every parameter in place from ``grads`` (same keys), at ``lr`` if given."""
        self._grads_for(grads)
        rate = self.lr if lr is None else _check_scalar(lr, "optimizer.step: lr")
        self.t += 1
        flat_g = flat_buffer(grads, list(self.params)) if self.flat is not None else None
        if flat_g is not None and flat_g.dtype == self.flat.dtype:
            self._step_flat(flat_g, rate)
            return
        for k, p in self.params.items():
            g = np.asarray(grads[k], dtype=p.dtype)
            if p.size < _PARALLEL_MIN or not (p.flags.c_contiguous and g.flags.c_contiguous):
                self._update(k, p, g, rate, slice(None))
                continue
            # large parameters: element-wise updates split over the workers
            flat_p, flat_g = p.reshape(-1), g.reshape(-1)

            def work(lo: int, hi: int, k: str = k, fp: np.ndarray = flat_p,
                     fg: np.ndarray = flat_g) -> None:
                self._update(k, fp, fg, rate, slice(lo, hi), decay=decays(self.params[k]))

            parallel_chunks(work, p.size, min_chunk=_PARALLEL_MIN // 2)

    def _step_flat(self, g: np.ndarray, rate: float) -> None:
        """One step on the flat parameter buffer from the flat gradient buffer ``g``: a few
        in-place ufuncs over the whole buffer (split over the workers), the same float32
        operations as the per-parameter path (identical results)."""
        p = self.flat
        assert p is not None
        wd = float(getattr(self, "weight_decay", 0.0))
        decayed = [(lo, hi) for lo, hi, dec in self._segments if dec]
        if wd and decayed:
            if getattr(self, "_decoupled", False):
                for lo, hi in decayed:
                    p[lo:hi] *= 1.0 - rate * wd
            else:  # L2: the decay term enters the gradient (a copy: grads stay untouched)
                g = g.copy()
                for lo, hi in decayed:
                    g[lo:hi] += wd * p[lo:hi]

        def work(lo: int, hi: int) -> None:
            self._update(FLAT, p, g, rate, slice(lo, hi), decay=False)

        parallel_chunks(work, p.size, min_chunk=_PARALLEL_MIN // 2)

    def _update(self, key: str, p: np.ndarray, g: np.ndarray, lr: float, part: slice,
                decay: bool | None = None) -> None:
        """Update ``p[part]`` (``p``, ``g`` and the buffers viewed alike) from ``g[part]``;
        ``key`` :data:`FLAT` is the flat buffer of every parameter."""
        raise NotImplementedError

    def _buf(self, slot: str, key: str, shape: tuple[int, ...], part: slice) -> np.ndarray:
        if key == FLAT:
            return self._flat_buffers[slot][part]
        return self.buffers[slot][key].reshape(shape)[part]

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """``{"step": 0-d, "lr": 0-d, "<slot>.<param>": array, ...}`` (copies)."""
        out: dict[str, np.ndarray] = {
            "step": np.array(self.t, dtype=np.int64),
            "lr": np.array(self.lr, dtype=np.float64),
        }
        for slot, bufs in self.buffers.items():
            for k, b in bufs.items():
                out[f"{slot}.{k}"] = b.copy()
        return out

    def load_state_dict(self, d: Mapping[str, np.ndarray]) -> None:
        """Restore a :meth:`state_dict`; keys and shapes must match exactly.

        Raises
        ------
        ModelError
            Listing missing and unexpected keys and shape mismatches.
        """
        expected = {"step": np.array(0, dtype=np.int64), "lr": np.array(0.0)}
        for slot, bufs in self.buffers.items():
            for k, b in bufs.items():
                expected[f"{slot}.{k}"] = b
        check_arrays(d, expected, where=f"{type(self).__name__}.load_state_dict")
        self.t = int(np.asarray(d["step"]))
        self.lr = float(np.asarray(d["lr"]))
        for slot, bufs in self.buffers.items():
            for k, b in bufs.items():
                b[...] = d[f"{slot}.{k}"]


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 decay.

    PyTorch convention: ``v = momentum * v + g``; the update is ``v`` (or
    ``g + momentum * v`` with Nesterov); ``p -= lr * update``.  The L2 term
    ``weight_decay * p`` is added to ``g`` for decayed parameters (see
    :func:`decays`).
    """

    slots = ("velocity",)

    def __init__(
        self,
        params: Mapping[str, np.ndarray],
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        self.momentum = _check_scalar(momentum, "SGD: momentum", hi=1.0)
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0.0:
            raise ModelError("SGD: nesterov=True needs momentum > 0")
        self.weight_decay = _check_scalar(weight_decay, "SGD: weight_decay")
        if self.momentum == 0.0:
            self.slots = ()
        super().__init__(params, lr)

    def _update(self, key: str, p: np.ndarray, g: np.ndarray, lr: float, part: slice,
                decay: bool | None = None) -> None:
        shape = p.shape
        p, g = p[part], g[part]
        if self.weight_decay and (decays(p) if decay is None else decay):
            g = g + self.weight_decay * p
        if self.momentum:
            v = self._buf("velocity", key, shape, part)
            v *= self.momentum
            v += g
            g = g + self.momentum * v if self.nesterov else v
        p -= lr * g


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; ``weight_decay`` is L2 added to the gradient.

    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``.
    """

    slots = ("m", "v")
    _decoupled = False

    def __init__(
        self,
        params: Mapping[str, np.ndarray],
        lr: float = 1e-3,
        betas: tuple[float, float] | list[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        name = type(self).__name__
        if not isinstance(betas, list | tuple) or len(betas) != 2:
            raise ModelError(f"{name}: betas must be a pair of numbers, got {betas!r}")
        self.betas = (
            _check_scalar(betas[0], f"{name}: betas[0]", hi=1.0),
            _check_scalar(betas[1], f"{name}: betas[1]", hi=1.0),
        )
        self.eps = _check_scalar(eps, f"{name}: eps", lo_open=True)
        self.weight_decay = _check_scalar(weight_decay, f"{name}: weight_decay")
        super().__init__(params, lr)
        self._tmp = {k: np.empty_like(p) for k, p in self.params.items()}
        if self.flat is not None:
            self._tmp[FLAT] = np.empty_like(self.flat)

    def _update(self, key: str, p: np.ndarray, g: np.ndarray, lr: float, part: slice,
                decay: bool | None = None) -> None:
        b1, b2 = self.betas
        shape = p.shape
        wd = self.weight_decay if (decays(p) if decay is None else decay) else 0.0
        p, g = p[part], g[part]
        if wd and self._decoupled:
            p *= 1.0 - lr * wd
        elif wd:
            g = g + wd * p
        m = self._buf("m", key, shape, part)
        v = self._buf("v", key, shape, part)
        tmp = self._tmp[key].reshape(shape)[part]
        m *= b1
        np.multiply(g, 1.0 - b1, out=tmp)
        m += tmp
        v *= b2
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - b2
        v += tmp
        bc1 = 1.0 - b1**self.t
        bc2 = 1.0 - b2**self.t
        # p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
        np.sqrt(v, out=tmp)
        tmp *= 1.0 / math.sqrt(bc2)
        tmp += self.eps
        np.divide(m, tmp, out=tmp)
        tmp *= lr / bc1
        p -= tmp


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): ``p *= 1 - lr * weight_decay``
    before the Adam update, for decayed parameters only (default ``weight_decay=0.01``)."""

    _decoupled = True

    def __init__(
        self,
        params: Mapping[str, np.ndarray],
        lr: float = 1e-3,
        betas: tuple[float, float] | list[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


#: Key of the flat buffer in :meth:`Optimizer._update` (not a parameter name: those
#: contain dots).
FLAT = "<flat>"


def flat_buffer(arrays: Mapping[str, np.ndarray], keys: list[str] | None = None
                ) -> np.ndarray | None:
    """The 1-D array of which ``arrays`` (in ``keys`` order, default dict order) are
    consecutive C-contiguous views covering it exactly, or None."""
    keys = list(arrays) if keys is None else keys
    if not keys:
        return None
    first = arrays[keys[0]]
    base = first.base
    if not isinstance(base, np.ndarray) or base.ndim != 1 or not base.flags.c_contiguous:
        return None
    addr = base.__array_interface__["data"][0]
    for k in keys:
        a = arrays[k]
        if a.base is not base or a.dtype != base.dtype or not a.flags.c_contiguous:
            return None
        if a.__array_interface__["data"][0] != addr:
            return None
        addr += a.nbytes
    if addr != base.__array_interface__["data"][0] + base.nbytes:
        return None
    return base


def _views(flat: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Consecutive views of ``flat`` shaped like the arrays of ``like`` (in order)."""
    out, lo = {}, 0
    for k, a in like.items():
        out[k] = flat[lo : lo + a.size].reshape(a.shape)
        lo += a.size
    return out


def _segments(params: Mapping[str, np.ndarray]) -> list[tuple[int, int, bool]]:
    """``(lo, hi, decays)`` of every parameter in the flat buffer."""
    out, lo = [], 0
    for p in params.values():
        out.append((lo, lo + p.size, decays(p)))
        lo += p.size
    return out


def flatten_parameters(model: Any) -> tuple[np.ndarray, np.ndarray]:
    """Put every parameter and gradient of ``model`` (a built layer or container) into one
    flat buffer each; the layers' ``params``/``grads`` entries become views of them.

    Values are kept.  An optimiser created afterwards on ``model.params`` then updates
    the whole model with a few ufunc calls on the flat buffers (:meth:`Optimizer.step`
    takes this path whenever the gradients it is given are views of one buffer too).
    Call it again after rebuilding the model.

    Returns
    -------
    (params, grads) : tuple of numpy.ndarray
        The flat ``(n_params,)`` buffers.

    Raises
    ------
    ModelError
        If the model has no parameters or mixes dtypes.
    """
    leaves: list[Any] = []

    def walk(layer: Any) -> None:
        kids = layer.sublayers()
        if kids:
            for kid in kids:
                walk(kid)
        elif layer.params:
            leaves.append(layer)

    walk(model)
    if not leaves:
        raise ModelError("flatten_parameters: the model has no parameters")
    dtypes = {p.dtype for layer in leaves for p in layer.params.values()}
    if len(dtypes) != 1:
        raise ModelError(f"flatten_parameters: parameters of several dtypes {sorted(map(str, dtypes))}")
    dt = dtypes.pop()
    total = sum(p.size for layer in leaves for p in layer.params.values())
    flat_p, flat_g = np.empty(total, dt), np.empty(total, dt)
    lo = 0
    for layer in leaves:
        for k in list(layer.params):
            p, g = layer.params[k], layer.grads.get(k)
            hi = lo + p.size
            flat_p[lo:hi] = p.reshape(-1)
            flat_g[lo:hi] = 0.0 if g is None else g.reshape(-1)
            layer.params[k] = flat_p[lo:hi].reshape(p.shape)
            layer.grads[k] = flat_g[lo:hi].reshape(p.shape)
            lo = hi
    return flat_p, flat_g


#: Optimiser name (as in the config) -> class.
OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def make_optimizer(name: str, params: Mapping[str, np.ndarray], **kwargs: Any) -> Optimizer:
    """Create an optimiser by name (``"sgd"``, ``"adam"``, ``"adamw"``).

    Raises
    ------
    ModelError
        Unknown name (the valid names are listed) or unknown keyword arguments
        (the accepted ones are listed).
    """
    cls = OPTIMIZERS.get(str(name).lower())
    if cls is None:
        raise ModelError(
            f"unknown optimizer {name!r}; valid: {', '.join(sorted(OPTIMIZERS))}"
        )
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self",
                                                                                  "params")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ModelError(
            f"optimizer {name!r}: unknown argument(s) {unknown}; accepted: {accepted}"
        )
    if cls is SGD and "lr" not in kwargs:
        raise ModelError("optimizer 'sgd': 'lr' is required")
    return cls(params, **kwargs)


def clip_grad_norm(grads: Mapping[str, np.ndarray], max_norm: float) -> float:
    """Scale all gradients in place so their global L2 norm is at most ``max_norm``.

    Returns
    -------
    float
        The global norm *before* clipping.
    """
    limit = _check_scalar(max_norm, "clip_grad_norm: max_norm", lo_open=True)
    total = math.sqrt(
        sum(float(np.dot(g.ravel().astype(np.float64), g.ravel().astype(np.float64)))
            for g in grads.values())
    )
    if total > limit:
        scale = limit / (total + 1e-12)
        for g in grads.values():
            g *= scale
    return total
