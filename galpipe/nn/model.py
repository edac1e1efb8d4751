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
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Importing the layer modules registers every built-in layer type.
import galpipe.nn.layers  # noqa: F401
from galpipe.errors import ModelError
from galpipe.nn.base import Layer, LayerProtocol, Step, layer_from_spec, register, register_estimate
from galpipe.nn.conv import Conv2D, conv_output_size, resolve_padding
from galpipe.nn.dense import Dense
from galpipe.nn.fast.threads import compute_region
from galpipe.nn.norm import BatchNorm

# --------------------------------------------------------------------------- spec expansion
#: Most layers :func:`expand_spec` produces unless told otherwise (a pipeline passes
#: ``limits.max_layers``); checked before expanding, so a huge ``repeat`` fails at once.
LAYER_CAP = 100_000


def count_layers(spec: Any) -> int:
    """Number of layers ``spec`` has once expanded (nested ``sequential``/``residual`` lists
    included), computed without expanding anything; malformed entries count as one layer
    (:func:`expand_spec` reports them)."""
    if isinstance(spec, str | bytes | dict) or not isinstance(spec, Sequence):
        return 1
    total = 0
    for entry in spec:
        if not isinstance(entry, dict):
            total += 1
            continue
        n = entry.get("repeat", 1)
        n = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1
        if "repeat" in entry and "layers" in entry:
            one = count_layers(entry["layers"])
        else:
            one = 1 + sum(count_layers(entry[k]) for k in ("layers", "body", "projection")
                          if isinstance(entry.get(k), list))
        total += n * one
    return total


def expand_spec(spec: Sequence[Any], *, where: str = "model",
                max_layers: int | None = None) -> list[dict[str, Any] | str]:
    """Expand ``repeat`` entries of an architecture spec.

    ``{"repeat": n, "layers": [...]}`` becomes ``n`` copies of the (recursively
    expanded) layer list; a single layer spec with ``"repeat": n`` becomes ``n``
    copies of that layer.  Other entries are returned unchanged (deep-copied).

    ``max_layers`` (default :data:`LAYER_CAP`) caps :func:`count_layers`, checked before
    anything is expanded.

    Raises
    ------
    ModelError
        A malformed entry, a ``repeat`` that is not a positive integer, or more layers
        than ``max_layers``.
    """
    if isinstance(spec, str | bytes | dict) or not isinstance(spec, Sequence):
        raise ModelError(f"{where}: an architecture must be a list of layer specs, got {spec!r}")
    cap = LAYER_CAP if max_layers is None else int(max_layers)
    n_layers = count_layers(spec)
    if n_layers > cap:
        raise ModelError(f"{where}: the architecture expands to {n_layers} layers (repeat entries included), "
                         f"more than the cap of {cap} (limits.max_layers)")
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

    def freeze(self, n: int) -> None:
        """Keep the first ``n`` layers fixed in training: they run in evaluation mode
        (batch normalisation uses its running statistics, dropout is off) and get no
        backward pass; their parameters are left out of the optimiser by the caller
        (:func:`galpipe.nn.training.fit`).  ``n = 0`` undoes it.

        Raises
        ------
        ModelError
            ``n`` negative or not smaller than the number of layers.
        """
        if not 0 <= int(n) < len(self.layers):
            raise ModelError(f"freeze: {n} layers of {len(self.layers)}: at least the last layer must train")
        self.n_frozen = int(n)
        if self.built:
            self._plan = self._make_plan()

    def frozen_keys(self) -> list[str]:
        """Parameter names (as in :attr:`params`) of the frozen layers."""
        return [k for k in self.params if int(k.split(".", 1)[0]) < self.n_frozen]

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
        #: Leading layers kept fixed in training (:meth:`freeze`).
        self.n_frozen = 0
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

    def estimate(self, input_shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        """``(parameter count, output shape)`` of the stack, allocating nothing (:func:`estimate_model`)."""
        n, out, _ = _estimate(self, tuple(input_shape))
        return n, out

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
            if step is not None and i < self.n_frozen < i + step.size:
                step = None  # a fused step must not straddle the frozen boundary
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
        for step, idx in self._plan:
            x = step.forward(x, training and idx[0] >= self.n_frozen)
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
            first = max(first, self.n_frozen)  # frozen layers need no gradients
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

    def estimate(self, input_shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        """``(parameter count, output shape)`` of body and shortcut, allocating nothing."""
        n, out, _ = _estimate(self, tuple(input_shape))
        return n, out

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


# --------------------------------------------------------------------------- size estimates
def _estimate(layer: Layer, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...], int]:
    """``(parameters, output shape, activation elements per sample)`` of ``layer``; no allocation.

    The activation elements are the outputs every layer keeps for the backward pass (nested
    layers of containers included).
    """
    if isinstance(layer, Sequential):
        shape = _check_shape(shape, "input_shape")
        n_params = acts = 0
        for i, child in enumerate(layer.layers):
            try:
                p, out, a = _estimate(child, shape)
            except ModelError as exc:
                raise ModelError(
                    f"layer {i} ({child.type_name}): got input of per-sample shape {shape}: {exc}"
                ) from exc
            n_params, acts, shape = n_params + p, acts + a, out
        return n_params, shape, acts
    if isinstance(layer, Residual):
        shape = _check_shape(shape, "residual input_shape")
        try:
            p, out, a = _estimate(layer.body, shape)
        except ModelError as exc:
            raise ModelError(f"body: {exc}") from exc
        proj = layer.proj
        if layer.projection_spec == "auto":
            proj = None if out == shape else Sequential([layer._auto_projection(shape, out)])
        if proj is not None:
            try:
                pp, pout, pa = _estimate(proj, shape)
            except ModelError as exc:
                raise ModelError(f"projection: {exc}") from exc
            if pout != out:
                raise ModelError(f"projection output shape {pout} does not match the body output {out}")
            p, a = p + pp, a + pa
        elif out != shape:
            raise ModelError(f"body output shape {out} differs from its input {shape}; use a projection "
                             "(projection: auto or a list of layer specs)")
        return p, out, a + math.prod(out)
    p, out = layer.estimate(shape)
    return p, out, math.prod(out)


@dataclass(frozen=True)
class LayerEstimate:
    """One top-level layer of :func:`estimate_model`: index, type, parameters, output shape,
    activation elements per sample (nested layers included)."""

    index: int
    type_name: str
    n_params: int
    output_shape: tuple[int, ...]
    activations: int


def estimate_model(spec: Sequence[Any], input_shape: tuple[int, ...], *,
                   max_layers: int | None = None) -> list[LayerEstimate]:
    """Per top-level layer sizes of the model :func:`build_model` would build, allocating nothing.

    Shape inference from the specs only (:meth:`Layer.estimate
    <galpipe.nn.base.Layer.estimate>`): instant even for ``{type: dense, units: 1000000000}``,
    so a caller can refuse a network before building it.  ``repeat`` entries are capped
    by ``max_layers`` before expanding (:func:`expand_spec`).

    Raises
    ------
    ModelError
        Unknown layer type or argument, bad ``repeat``, too many layers, or a shape error
        naming the layer (as :func:`build_model`).
    """
    layers = Sequential(expand_spec(spec, max_layers=max_layers)).layers
    shape = _check_shape(tuple(input_shape), "input_shape")
    out: list[LayerEstimate] = []
    for i, layer in enumerate(layers):
        try:
            p, shape_out, a = _estimate(layer, shape)
        except ModelError as exc:
            raise ModelError(f"layer {i} ({layer.type_name}): got input of per-sample shape {shape}: {exc}") from exc
        out.append(LayerEstimate(i, layer.type_name, int(p), shape_out, int(a)))
        shape = shape_out
    return out


@register_estimate(Dense)
def _dense_estimate(layer: Dense, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    if len(shape) != 1:
        raise ModelError(f"dense expects flat per-sample input of shape (F,), got {shape} "
                         "(insert a 'flatten' or 'global_avg_pool' layer before it)")
    return shape[0] * layer.units + (layer.units if layer.use_bias else 0), (layer.units,)


@register_estimate(Conv2D)
def _conv2d_estimate(layer: Conv2D, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    if len(shape) != 3:
        raise ModelError(f"conv2d expects per-sample input of shape (H, W, C), got {shape}")
    h, w, c = shape
    (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
    (pt, pb), (pl, pr) = resolve_padding(layer.padding, (h, w), (kh, kw), (sh, sw))
    ho, wo = conv_output_size(h, kh, sh, pt, pb), conv_output_size(w, kw, sw, pl, pr)
    if ho < 1 or wo < 1:
        raise ModelError(f"conv2d: kernel {kh}x{kw} with stride {sh}x{sw} and padding {layer.padding!r} "
                         f"does not fit input {h}x{w} (output would be {ho}x{wo})")
    return kh * kw * c * layer.filters + (layer.filters if layer.use_bias else 0), (ho, wo, layer.filters)


@register_estimate(BatchNorm)
def _batchnorm_estimate(layer: BatchNorm, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    if len(shape) not in (1, 3):
        raise ModelError(f"batchnorm expects per-sample input (H, W, C) or (F,), got {shape}")
    return 2 * shape[-1], shape


# --------------------------------------------------------------------------- build_model
def build_model(
    spec: Sequence[Any],
    input_shape: tuple[int, ...],
    seed: int = 0,
    dtype: np.dtype | type = np.float32,
    max_layers: int | None = None,
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
    max_layers : int, optional
        Cap on the expanded layer count (:func:`expand_spec`; default :data:`LAYER_CAP`).

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
    expanded = expand_spec(spec, max_layers=max_layers)
    model = Sequential(expanded)
    model.build(tuple(input_shape), np.random.default_rng(seed), dtype)
    return model
