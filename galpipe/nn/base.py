"""The layer protocol and the registry from type name to layer class.

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
  from which :func:`layer_from_spec` rebuilds an identical (unbuilt) layer.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from galpipe.errors import ModelError


@runtime_checkable
class LayerProtocol(Protocol):
    """Structural type every layer satisfies."""

    params: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray: ...

    def backward(self, dout: np.ndarray) -> np.ndarray: ...

    def get_config(self) -> dict[str, Any]: ...


class Layer:
    """Base class implementing the bookkeeping of the layer protocol.

    Subclasses set ``type_name`` (via :func:`register`), implement
    :meth:`_build` (optional), :meth:`forward`, :meth:`backward` and
    :meth:`get_config`, and may override :meth:`flops`.
    """

    type_name: ClassVar[str] = "layer"

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

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """Backward pass: fill ``self.grads`` and return the gradient w.r.t. the input."""
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        """JSON-serialisable spec ``{"type": type_name, **constructor kwargs}``."""
        return {"type": self.type_name}

    def flops(self) -> int:
        """Approximate forward floating-point operations per sample (multiply-add = 2)."""
        return 0

    def n_params(self) -> int:
        """Number of trainable scalars."""
        return int(sum(p.size for p in self.params.values()))

    def sublayers(self) -> list[Layer]:
        """Child layers (containers override this)."""
        return []

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "type")
        return f"{type(self).__name__}({args})"


#: Registry: layer type name (as written in YAML) -> class.
LAYERS: dict[str, type[Layer]] = {}


def register(name: str) -> Callable[[type[Layer]], type[Layer]]:
    """Class decorator registering a layer under ``name`` (the YAML ``type``)."""

    def deco(cls: type[Layer]) -> type[Layer]:
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
        return cls(**kwargs)
    except ModelError as exc:
        raise ModelError(f"{where}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{where}: bad arguments for {type_name!r}: {exc}") from exc
