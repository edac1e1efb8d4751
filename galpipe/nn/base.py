"""The layer protocol, the :class:`Layer` base class and the registry of layer types.

Conventions used by every layer in :mod:`galpipe.nn`:

* Arrays are float32 (float64 allowed, used by the gradient checks), images are
  channels-last: a batch of images has shape ``(N, H, W, C)``; dense
  activations have shape ``(N, F)``.
* ``build(input_shape, rng)`` receives the *per-sample* input shape (no batch
  axis), allocates parameters and returns the per-sample output shape.  A
  layer that is not built builds itself on its first ``forward`` (lazy shape
  inference); :class:`galpipe.nn.model.Sequential` builds all layers up front
  when given an input shape.
* ``forward(x, training)`` caches what ``backward`` needs; ``backward(dout)``
  fills ``grads`` (same keys and shapes as ``params``) and returns ``dx``.
* ``params`` / ``grads`` are dicts ``name -> ndarray``; optimisers live
  outside the layers and update ``params`` arrays in place.
* ``state`` holds non-trained buffers saved with the weights (BatchNorm running
  statistics).
* ``get_config()`` returns a JSON-serialisable spec ``{"type": ..., **kwargs}``
  from which :func:`layer_from_spec` rebuilds an identical (unbuilt) layer.  It
  is derived from the constructor's signature: :class:`Layer` records the
  arguments every layer was constructed with.
* A layer may offer a faster implementation of itself (possibly fused with the
  layers after it) through :meth:`Layer.fast_step`; the layers after it are
  recognised by what they declare in :attr:`Layer.fusion_tag`, never by their
  class.  The kernels live in :mod:`galpipe.nn.fast`.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from galpipe.errors import ModelError


@runtime_checkable
class LayerProtocol(Protocol):
    """What a layer must provide (checked by :func:`layer_from_spec` on every layer it builds).

    :class:`Layer` implements all of it; subclass it rather than starting from scratch.
    """

    params: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    state: dict[str, np.ndarray]

    def build(
        self, input_shape: tuple[int, ...], rng: np.random.Generator | None = None,
        dtype: np.dtype | type = np.float32,
    ) -> tuple[int, ...]: ...

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray: ...

    def backward(self, dout: np.ndarray) -> np.ndarray | None: ...

    def get_config(self) -> dict[str, Any]: ...

    def flops(self) -> int: ...


@runtime_checkable
class Step(Protocol):
    """One step of a model's execution plan: a layer, or a fast kernel for one or more
    consecutive layers (see :meth:`Layer.fast_step`).

    ``forward(x, training)`` maps the input of the first layer covered to the output of
    the last; ``backward(dout)`` fills the covered layers' ``grads`` and returns the
    gradient w.r.t. the step's input (or None when the first layer's
    ``input_grad_needed`` is False).
    """

    #: Short name of the step, e.g. ``"conv_relu_pool"`` (reported by ``execution_plan``).
    kind: str
    #: Number of consecutive layers the step covers.
    size: int

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray: ...

    def backward(self, dout: np.ndarray) -> np.ndarray | None: ...


def _jsonable(value: Any) -> Any:
    """Tuples to lists and NumPy scalars to Python numbers, recursively."""
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


class Layer:
    """Base class implementing the bookkeeping of the layer protocol.

    A subclass implements ``forward`` and ``backward``, usually ``_build`` (create
    ``self.params`` and return the output shape) and ``flops``, and is registered
    with :func:`register`.  ``get_config`` comes for free: the arguments a layer is
    constructed with are recorded (:meth:`__new__`), so the constructor's keyword
    arguments are the layer's spec.  Values must be JSON-serialisable.
    """

    type_name: ClassVar[str] = "layer"

    #: Set to ``False`` by a container when nobody needs the gradient w.r.t. this
    #: layer's input (the first layer of a model): layers that can, then skip
    #: computing it and ``backward`` returns ``None``.
    input_grad_needed: bool = True

    def __new__(cls, *args: Any, **kwargs: Any) -> Layer:
        """Record the constructor arguments (defaults filled in) for :meth:`get_config`."""
        self = super().__new__(cls)
        sig = inspect.signature(cls.__init__)
        try:
            bound = sig.bind(self, *args, **kwargs)
        except TypeError:
            self._init_args = {}  # __init__ will raise the same TypeError
            return self
        bound.apply_defaults()
        arguments = dict(list(bound.arguments.items())[1:])
        for p in sig.parameters.values():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(p.name, {}))
        self._init_args = arguments
        return self

    def __init__(self, name: str | None = None) -> None:
        self.name = name
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.state: dict[str, np.ndarray] = {}
        self.built = False
        self.input_shape: tuple[int, ...] | None = None
        self.output_shape: tuple[int, ...] | None = None
        self.dtype: np.dtype = np.dtype(np.float32)

    # -- shape inference -------------------------------------------------------------
    def build(
        self,
        input_shape: tuple[int, ...],
        rng: np.random.Generator | None = None,
        dtype: np.dtype | type = np.float32,
    ) -> tuple[int, ...]:
        """Allocate parameters for per-sample ``input_shape``; return the output shape."""
        self.dtype = np.dtype(dtype)
        self.input_shape = tuple(int(d) for d in input_shape)
        rng = rng if rng is not None else np.random.default_rng(0)
        self.output_shape = tuple(int(d) for d in self._build(self.input_shape, rng))
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.built = True
        return self.output_shape

    def _build(self, input_shape: tuple[int, ...], rng: np.random.Generator) -> tuple[int, ...]:
        """Subclass hook: create ``self.params`` and return the output shape."""
        return input_shape

    def _ensure_built(self, x: np.ndarray) -> None:
        if not self.built:
            self.build(x.shape[1:], dtype=x.dtype if x.dtype == np.float64 else np.float32)

    # -- protocol --------------------------------------------------------------------
    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Forward pass on a batch; shapes documented per layer."""
        raise NotImplementedError

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        """Backward pass: fill ``self.grads`` and return the gradient w.r.t. the input."""
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        """JSON-serialisable spec ``{"type": type_name, **constructor arguments}``.

        The arguments are those the layer was constructed with (defaults filled
        in); ``name`` is left out when it is None.
        """
        args = {k: _jsonable(v) for k, v in self._init_args.items()}
        if args.get("name", 0) is None:
            del args["name"]
        return {"type": self.type_name, **args}

    def flops(self) -> int:
        """Approximate forward floating-point operations per sample (multiply-add = 2)."""
        return 0

    def n_params(self) -> int:
        """Number of trainable scalars."""
        return int(sum(p.size for p in self.params.values()))

    def estimate(self, input_shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        """``(parameter count, per-sample output shape)`` for per-sample ``input_shape``, allocating nothing.

        Used to refuse a network too large to build (:func:`galpipe.nn.model.estimate_model`).
        A layer type with an estimator registered with :func:`register_estimate` uses it (the
        built-in ``dense``, ``conv2d`` and ``batchnorm`` do); a layer whose ``_build`` is the
        base one has no parameters and keeps the shape; any other layer is built on a fresh
        copy, which allocates its parameters: a layer type with parameters should register
        an estimator.

        Raises
        ------
        ModelError
            The input shape does not suit the layer (the message of ``build``).
        """
        shape = tuple(int(d) for d in input_shape)
        for cls in type(self).__mro__:
            fn = ESTIMATORS.get(cls)
            if fn is not None:
                n, out = fn(self, shape)
                return int(n), tuple(int(d) for d in out)
        if type(self)._build is Layer._build:
            return 0, shape
        probe = layer_from_spec(self.get_config(), where=self.type_name)
        out = probe.build(shape)
        return probe.n_params(), out

    # -- fast path ---------------------------------------------------------------------
    @property
    def fusion_tag(self) -> str | None:
        """What this layer is to the fusion rules of a fast kernel *before* it.

        E.g. ``"relu"`` (:class:`~galpipe.nn.activations.ReLU`) or ``"maxpool2x2"``
        (a 2x2 stride-2 max-pool); None: nothing a kernel may fuse.  A subclass that
        changes the maths of a tagged layer must set it back to None.
        """
        return None

    def fast_step(self, following: Sequence[Layer]) -> Step | None:
        """A fast implementation of this layer, possibly fused with the layers after it.

        Parameters
        ----------
        following : sequence of Layer
            The built layers after this one in its :class:`~galpipe.nn.model.Sequential`.

        Returns
        -------
        Step or None
            A step covering this layer and the next ``step.size - 1`` ones, computing
            what they compute (outputs and input gradients identical; parameter
            gradients up to the order of float sums); None: run the layer itself.
        """
        return None

    # -- structure ---------------------------------------------------------------------
    def sublayers(self) -> list[Layer]:
        """Child layers (containers override this)."""
        return [layer for _, layer in self.named_children()]

    def named_children(self) -> list[tuple[str, Layer]]:
        """``(prefix, child)`` pairs of a container, used for flat parameter names.

        A child's parameter ``W`` is exposed by the container as ``f"{prefix}.W"``.
        Plain layers have no children.
        """
        return []

    def set_rng(self, rng: np.random.Generator) -> None:
        """Reseed the layer's random stream(s) (dropout); containers recurse in order."""
        for _, child in self.named_children():
            child.set_rng(np.random.default_rng(rng.integers(0, 2**63 - 1)))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "type")
        return f"{type(self).__name__}({args})"


#: Registry: layer type name (as written in YAML) -> class.
LAYERS: dict[str, type[Layer]] = {}

#: Size estimators: layer class -> ``fn(layer, input_shape) -> (n_params, output_shape)``,
#: computed from shapes alone (see :meth:`Layer.estimate`); subclasses inherit them.
Estimator = Callable[[Any, tuple[int, ...]], tuple[int, tuple[int, ...]]]
ESTIMATORS: dict[type, Estimator] = {}


def register_estimate(cls: type[Layer]) -> Callable[[Estimator], Estimator]:
    """Decorator registering the no-allocation size estimator of layer class ``cls``."""

    def deco(fn: Estimator) -> Estimator:
        ESTIMATORS[cls] = fn
        return fn

    return deco


def register(name: str) -> Callable[[type[Layer]], type[Layer]]:
    """Class decorator registering a layer under ``name`` (the YAML ``type``)."""

    def deco(cls: type[Layer]) -> type[Layer]:
        if not (isinstance(cls, type) and issubclass(cls, Layer)):
            raise ModelError(f"register({name!r}): {cls!r} is not a subclass of Layer")
        if name in LAYERS and LAYERS[name] is not cls:
            raise ModelError(f"layer type {name!r} registered twice")
        cls.type_name = name
        LAYERS[name] = cls
        return cls

    return deco


def layer_from_spec(spec: dict[str, Any] | str, *, where: str = "layer") -> Layer:
    """Instantiate one layer from a spec such as ``{"type": "conv2d", "filters": 16}``.

    A bare string is shorthand for a layer without arguments (``"relu"``).

    Raises
    ------
    ModelError
        Unknown ``type`` (the message lists the valid types) or bad arguments
        (the message lists the accepted ones).
    """
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict) or "type" not in spec:
        raise ModelError(f"{where}: a layer spec must be a mapping with a 'type' key, got {spec!r}")
    kwargs = dict(spec)
    type_name = kwargs.pop("type")
    cls = LAYERS.get(str(type_name).lower()) if isinstance(type_name, str) else None
    if cls is None:
        close = difflib.get_close_matches(str(type_name), LAYERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ModelError(
            f"{where}: unknown layer type {type_name!r}{hint}; valid types: "
            + ", ".join(sorted(LAYERS))
        )
    sig = inspect.signature(cls.__init__)
    accepted = [p for p in sig.parameters if p != "self"]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise ModelError(
            f"{where}: layer type {type_name!r} got unknown argument(s) {unknown}; "
            f"accepted: {accepted}"
        )
    try:
        layer = cls(**kwargs)
    except ModelError as exc:
        raise ModelError(f"{where}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{where}: bad arguments for {type_name!r}: {exc}") from exc
    if not isinstance(layer, LayerProtocol):
        missing = [m for m in ("params", "grads", "state", "build", "forward", "backward",
                               "get_config", "flops") if not hasattr(layer, m)]
        raise ModelError(f"{where}: {cls.__name__} does not implement the layer protocol "
                         f"(missing {missing}); subclass galpipe.nn.Layer")
    return layer
