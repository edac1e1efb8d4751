"""Containers (:class:`Sequential`, :class:`Residual`) and :func:`build_model`.

Architecture specs are lists of layer specs as written in YAML::

    - {type: conv2d, filters: 16}
    - relu
    - {repeat: 2, layers: [{type: conv2d, filters: 32}, relu]}
    - {type: residual, body: [{type: conv2d, filters: 32}, relu], projection: auto}
    - {type: maxpool2d, repeat: 2}
    - flatten
    - {type: dense, units: 3}

Parameter names are flat and stable: ``"<index>.<type>.<param>"`` for the layers
of a :class:`Sequential` (e.g. ``"0.conv2d.W"``), nested with the child's prefix
for containers (``"3.residual.body.0.conv2d.W"``, ``"3.residual.proj.0.conv2d.b"``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

# Importing the layer modules registers every built-in layer type.
import galpipe.nn.layers  # noqa: F401
from galpipe.errors import ModelError
from galpipe.nn.base import Layer, LayerProtocol, Step, layer_from_spec, register
from galpipe.nn.fast.threads import compute_region


# --------------------------------------------------------------------------- spec expansion
def expand_spec(spec: Sequence[Any], *, where: str = "model") -> list[dict[str, Any] | str]:
    """Expand ``repeat`` entries of an architecture spec.

    ``{"repeat": n, "layers": [...]}`` becomes ``n`` copies of the (recursively
    expanded) layer list; a single layer spec with ``"repeat": n`` becomes ``n``
    copies of that layer.  Other entries are returned unchanged (deep-copied).

    Raises
    ------
    ModelError
        A malformed entry or a ``repeat`` that is not a positive integer.
    """
    if isinstance(spec, str | bytes | dict) or not isinstance(spec, Sequence):
        raise ModelError(f"{where}: an architecture must be a list of layer specs, got {spec!r}")
    out: list[dict[str, Any] | str] = []
    for i, entry in enumerate(spec):
        here = f"{where} entry {i}"
        if isinstance(entry, str):
            out.append(entry)
            continue
        if not isinstance(entry, dict):
            raise ModelError(f"{here}: expected a layer spec mapping or a type name, got {entry!r}")
        if "repeat" not in entry:
            out.append(copy.deepcopy(entry))
            continue
        n = entry["repeat"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ModelError(f"{here}: 'repeat' must be a positive integer, got {n!r}")
        if "layers" in entry:
            extra = sorted(set(entry) - {"repeat", "layers"})
            if extra:
                raise ModelError(
                    f"{here}: a repeat block takes only 'repeat' and 'layers', got extra {extra}"
                )
            block = expand_spec(entry["layers"], where=f"{here} (repeat block)")
            for _ in range(n):
                out.extend(copy.deepcopy(block))
        else:
            if "type" not in entry:
                raise ModelError(
                    f"{here}: a 'repeat' entry needs either 'layers' (a block) or 'type'"
                )
            single = {k: v for k, v in entry.items() if k != "repeat"}
            out.extend(copy.deepcopy(single) for _ in range(n))
    return out


def _check_shape(shape: Any, what: str) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise ModelError(f"{what}: expected a tuple of positive integers, got {shape!r}") from None
    if not dims or any(
        isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 1 for d in dims
    ):
        raise ModelError(f"{what}: expected a tuple of positive integers, got {shape!r}")
    return tuple(int(d) for d in dims)


# --------------------------------------------------------------------------- containers
class _Container(Layer):
    """A layer whose parameters, gradients and buffers are those of its children.

    ``params``/``grads``/``state`` are flat dicts of the children's *live* arrays,
    recomputed on access (cheap), so optimisers updating them in place update the
    children.
    """

    @property  # type: ignore[override]
    def params(self) -> dict[str, np.ndarray]:
        return self._collect("params")

    @params.setter
    def params(self, value: dict[str, np.ndarray]) -> None:
        if value:
            raise ModelError(f"{self.type_name}: parameters belong to the child layers")

    @property  # type: ignore[override]
    def grads(self) -> dict[str, np.ndarray]:
        return self._collect("grads")

    @grads.setter
    def grads(self, value: dict[str, np.ndarray]) -> None:
        if value:
            raise ModelError(f"{self.type_name}: gradients belong to the child layers")

    @property  # type: ignore[override]
    def state(self) -> dict[str, np.ndarray]:
        return self._collect("state")

    @state.setter
    def state(self, value: dict[str, np.ndarray]) -> None:
        if value:
            raise ModelError(f"{self.type_name}: buffers belong to the child layers")

    def _collect(self, attr: str) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for prefix, child in self.named_children():
            for key, arr in getattr(child, attr).items():
                out[f"{prefix}.{key}"] = arr
        return out

    def flops(self) -> int:
        return int(sum(child.flops() for _, child in self.named_children()))

    def n_params(self) -> int:
        return int(sum(child.n_params() for _, child in self.named_children()))

    def use_fast_path(self, enabled: bool = True) -> None:
        """Run the fast kernels of :mod:`galpipe.nn.fast` (default) or only the reference
        layers (``enabled=False``), in this container and every nested one."""
        for _, child in self.named_children():
            if isinstance(child, _Container):
                child.use_fast_path(enabled)

    def set_mc_dropout(self, enabled: bool) -> None:
        """Make every dropout layer (nested ones included) draw masks even in inference
        mode (Monte-Carlo dropout; see :func:`galpipe.nn.inference.mc_dropout_active`)."""
        for _, child in self.named_children():
            if isinstance(child, _Container):
                child.set_mc_dropout(enabled)
            elif hasattr(child, "mc_sampling"):
                child.mc_sampling = bool(enabled)


@register("sequential")
class Sequential(_Container):
    """A stack of layers applied in order; itself a layer (``type: sequential``).

    Parameters
    ----------
    layers : list
        :class:`~galpipe.nn.base.Layer` instances or layer specs (dicts / type
        names, ``repeat`` entries allowed).
    name : str, optional
        Free-form name (kept in the config).

    Notes
    -----
    Use :func:`build_model` to build a model with a known input shape and seed.
    By default layers run on the fast path: each layer may offer a fast step,
    possibly fused with the layers after it (:meth:`Layer.fast_step
    <galpipe.nn.base.Layer.fast_step>`; see :meth:`execution_plan`): identical
    outputs and input gradients (parameter gradients up to the order of float
    sums), much less memory traffic -- e.g. ``conv2d, relu, maxpool2d`` pools each
    piece of the convolution output while it is in cache.  After a forward pass the
    individual layers' caches are not populated, so run the backward pass through
    the container.  :meth:`use_fast_path` switches to the reference layers.
    """

    def __init__(self, layers: Sequence[Any], name: str | None = None) -> None:
        super().__init__(name)
        if isinstance(layers, str | bytes | dict) or not isinstance(layers, Sequence):
            raise ModelError(f"sequential: 'layers' must be a list, got {layers!r}")
        items: list[Layer] = []
        if all(isinstance(item, Layer) for item in layers):
            items = list(layers)
        else:
            # specs (and any Layer instances among them, re-created from their configs)
            pending = expand_spec(
                [item.get_config() if isinstance(item, Layer) else item for item in layers],
                where="sequential",
            )
            items = [layer_from_spec(s, where=f"layer {i}") for i, s in enumerate(pending)]
        if not items:
            raise ModelError("sequential: needs at least one layer")
        for i, item in enumerate(items):
            if not isinstance(item, LayerProtocol):
                raise ModelError(f"sequential: item {i} ({item!r}) is not a layer")
        self.layers: list[Layer] = items
        self.fast = True
        self._plan: list[tuple[Step, tuple[int, ...]]] | None = None

    # -- structure ------------------------------------------------------------------
    def named_children(self) -> list[tuple[str, Layer]]:
        return [(f"{i}.{layer.type_name}", layer) for i, layer in enumerate(self.layers)]

    def get_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"type": self.type_name, "layers": self.spec}
        if self.name is not None:
            cfg["name"] = self.name
        return cfg

    @property
    def spec(self) -> list[dict[str, Any]]:
        """The expanded list of layer specs (``repeat`` resolved)."""
        return [layer.get_config() for layer in self.layers]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> Layer:
        return self.layers[index]

    # -- build ----------------------------------------------------------------------
    def build(
        self,
        input_shape: tuple[int, ...],
        rng: np.random.Generator | None = None,
        dtype: np.dtype | type = np.float32,
    ) -> tuple[int, ...]:
        """Build every layer for per-sample ``input_shape``; return the output shape.

        Raises
        ------
        ModelError
            Naming the layer index and type and the shape it received.
        """
        self.dtype = np.dtype(dtype)
        shape = _check_shape(input_shape, "input_shape")
        self.input_shape = shape
        rng = rng if rng is not None else np.random.default_rng(0)
        for i, layer in enumerate(self.layers):
            try:
                shape = layer.build(shape, rng, self.dtype)
            except ModelError as exc:
                raise ModelError(
                    f"layer {i} ({layer.type_name}): got input of per-sample shape {shape}: {exc}"
                ) from exc
        self.output_shape = shape
        self.built = True
        self._plan = self._make_plan()
        return shape

    def _make_plan(self) -> list[tuple[Step, tuple[int, ...]]]:
        """Execution steps ``(step, layer indices)``.

        Each layer in turn is asked for a fast step (given the layers after it, which
        the step may fuse); a layer without one (or all, when :attr:`fast` is off) is
        its own step.
        """
        plan: list[tuple[Step, tuple[int, ...]]] = []
        i = 0
        while i < len(self.layers):
            layer = self.layers[i]
            step = layer.fast_step(self.layers[i + 1 :]) if self.fast else None
            if step is None:
                plan.append((layer, (i,)))  # type: ignore[arg-type]
                i += 1
            else:
                plan.append((step, tuple(range(i, i + step.size))))
                i += step.size
        return plan

    def execution_plan(self) -> list[tuple[str, tuple[int, ...]]]:
        """``(kind, layer indices)`` of every step, e.g. ``("conv_relu_pool", (0, 1, 2))``;
        kind ``"layer"`` is a layer run by itself (reference implementation)."""
        if self._plan is None:
            raise ModelError("sequential: not built")
        return [(step.kind if step is not self.layers[idx[0]] else "layer", idx)
                for step, idx in self._plan]

    def use_fast_path(self, enabled: bool = True) -> None:
        """Run the layers' fast steps (default) or the reference layers only; nested
        containers follow."""
        self.fast = bool(enabled)
        if self.built:
            self._plan = self._make_plan()
        super().use_fast_path(enabled)

    # -- forward / backward -------------------------------------------------------------
    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Run the stack on a batch ``(N, *input_shape)``; returns ``(N, *output_shape)``."""
        with compute_region():
            return self._forward(x, training)

    def _forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        x = np.asarray(x)
        if not self.built:
            self.build(x.shape[1:], dtype=np.float64 if x.dtype == np.float64 else np.float32)
        if x.ndim != len(self.input_shape) + 1 or x.shape[1:] != self.input_shape:
            raise ModelError(
                f"{self.name or 'model'}: expects a batch of per-sample shape {self.input_shape}"
                f" (array of shape (N, {', '.join(map(str, self.input_shape))})), got {x.shape}"
            )
        if x.dtype != self.dtype:
            x = x.astype(self.dtype)
        assert self._plan is not None
        for step, _ in self._plan:
            x = step.forward(x, training)
        return x

    def backward(self, dout: np.ndarray, input_grad: bool | None = None) -> np.ndarray | None:
        """Backpropagate ``dout`` (shape of the output); fill every layer's ``grads``.

        Parameters
        ----------
        dout : numpy.ndarray
            Gradient of the loss w.r.t. the output of the last :meth:`forward`.
        input_grad : bool, optional
            Whether the gradient w.r.t. the model input is wanted (default: the
            :attr:`input_grad_needed` attribute, True).  Pass False in training
            loops: the first layers then skip work nobody uses.

        Returns
        -------
        numpy.ndarray or None
            ``dx`` of the input's shape, or None when ``input_grad`` is False.
        """
        if self._plan is None:
            raise ModelError("sequential: backward called before forward")
        with compute_region():
            return self._backward(dout, input_grad)

    def _backward(self, dout: np.ndarray, input_grad: bool | None) -> np.ndarray | None:
        need = self.input_grad_needed if input_grad is None else bool(input_grad)
        first = 0
        if not need:
            # Leading parameter-free layers need no backward at all.
            while first < len(self.layers) - 1 and self.layers[first].n_params() == 0:
                first += 1
        for i, layer in enumerate(self.layers):
            layer.input_grad_needed = need or i > first
        d: np.ndarray | None = np.asarray(dout, dtype=self.dtype)
        for step, idx in reversed(self._plan):
            if idx[-1] < first:
                break
            d = step.backward(d)  # type: ignore[arg-type]
        return d if need else None

    def set_rng(self, rng: np.random.Generator) -> None:
        """Reseed every dropout layer (in order) from ``rng``; deterministic."""
        for layer in self.layers:
            layer.set_rng(np.random.default_rng(rng.integers(0, 2**63 - 1)))


@register("residual")
class Residual(_Container):
    """Residual block: ``body(x) + projection(x)`` (or ``+ x``).

    Parameters
    ----------
    body : list
        Layer specs of the main branch.
    projection : list, None or "auto"
        Specs of the shortcut branch; ``None`` is the identity (the body must then
        preserve the shape); ``"auto"`` is the identity when the shapes match and
        otherwise a 1x1 ``conv2d`` (stride chosen to match the spatial size) or a
        ``dense`` layer for flat inputs.
    """

    def __init__(
        self, body: Sequence[Any], projection: Sequence[Any] | str | None = "auto",
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.body = Sequential(body)
        if projection is None or projection == "auto":
            self.projection_spec: list[Any] | str | None = projection
            self.proj: Sequential | None = None
        elif isinstance(projection, str):
            raise ModelError(
                f"residual: projection must be a list of layer specs, None or 'auto', "
                f"got {projection!r}"
            )
        else:
            self.proj = Sequential(projection)
            self.projection_spec = self.proj.spec

    def named_children(self) -> list[tuple[str, Layer]]:
        kids: list[tuple[str, Layer]] = [("body", self.body)]
        if self.proj is not None:
            kids.append(("proj", self.proj))
        return kids

    def get_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "type": self.type_name,
            "body": self.body.spec,
            "projection": copy.deepcopy(self.projection_spec),
        }
        if self.name is not None:
            cfg["name"] = self.name
        return cfg

    def build(
        self,
        input_shape: tuple[int, ...],
        rng: np.random.Generator | None = None,
        dtype: np.dtype | type = np.float32,
    ) -> tuple[int, ...]:
        self.dtype = np.dtype(dtype)
        shape = _check_shape(input_shape, "residual input_shape")
        self.input_shape = shape
        rng = rng if rng is not None else np.random.default_rng(0)
        try:
            out = self.body.build(shape, rng, self.dtype)
        except ModelError as exc:
            raise ModelError(f"body: {exc}") from exc
        if self.projection_spec == "auto":
            self.proj = None if out == shape else Sequential([self._auto_projection(shape, out)])
        if self.proj is not None:
            try:
                pout = self.proj.build(shape, rng, self.dtype)
            except ModelError as exc:
                raise ModelError(f"projection: {exc}") from exc
            if pout != out:
                raise ModelError(
                    f"projection output shape {pout} does not match the body output {out}"
                )
        elif out != shape:
            raise ModelError(
                f"body output shape {out} differs from its input {shape}; use a projection "
                "(projection: auto or a list of layer specs)"
            )
        self.output_shape = out
        self.built = True
        return out

    @staticmethod
    def _auto_projection(shape: tuple[int, ...], out: tuple[int, ...]) -> dict[str, Any]:
        if len(shape) == 3 and len(out) == 3:
            (h, w, _), (ho, wo, f) = shape, out
            sh, sw = -(-h // ho), -(-w // wo)
            if -(-h // sh) == ho and -(-w // sw) == wo:
                stride: int | list[int] = sh if sh == sw else [sh, sw]
                return {"type": "conv2d", "filters": f, "kernel_size": 1, "stride": stride,
                        "padding": "valid", "use_bias": False}
        if len(shape) == 1 and len(out) == 1:
            return {"type": "dense", "units": out[0], "use_bias": False, "init": "glorot"}
        raise ModelError(
            f"cannot build an automatic projection from {shape} to {out}; give "
            "'projection' explicitly"
        )

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """``body(x) + shortcut(x)``; shapes as the body."""
        if not self.built:
            self.build(x.shape[1:], dtype=np.float64 if x.dtype == np.float64 else np.float32)
        y = self.body.forward(x, training)
        short = self.proj.forward(x, training) if self.proj is not None else x
        return y + short

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        need = self.input_grad_needed
        dx_body = self.body.backward(dout, input_grad=need)
        if self.proj is not None:
            dx_short = self.proj.backward(dout, input_grad=need)
        else:
            dx_short = dout
        if not need:
            return None
        assert dx_body is not None and dx_short is not None
        return dx_body + dx_short

    def set_rng(self, rng: np.random.Generator) -> None:
        self.body.set_rng(np.random.default_rng(rng.integers(0, 2**63 - 1)))
        if self.proj is not None:
            self.proj.set_rng(np.random.default_rng(rng.integers(0, 2**63 - 1)))


# --------------------------------------------------------------------------- build_model
def build_model(
    spec: Sequence[Any],
    input_shape: tuple[int, ...],
    seed: int = 0,
    dtype: np.dtype | type = np.float32,
) -> Sequential:
    """Instantiate and build a model from an architecture spec.

    Parameters
    ----------
    spec : list
        Layer specs (see the module docstring); ``repeat`` entries are expanded.
    input_shape : tuple of int
        Per-sample input shape, e.g. ``(64, 64, 3)`` for channels-last images.
    seed : int
        Seed of the generator used for every initialiser and dropout stream:
        two builds with the same spec and seed have identical weights.
    dtype : numpy dtype
        Parameter/activation dtype (float32; float64 for gradient checks).

    Returns
    -------
    Sequential
        A built model (``model.spec`` holds the expanded layer specs).

    Raises
    ------
    ModelError
        Unknown layer type or argument (valid choices listed), bad ``repeat``, or a
        shape error naming the layer, e.g. ``"layer 5 (dense): got input of
        per-sample shape (8, 8, 64): dense expects flat per-sample input ..."``.
    """
    expanded = expand_spec(spec)
    model = Sequential(expanded)
    model.build(tuple(input_shape), np.random.default_rng(seed), dtype)
    return model
