"""The "add a layer" recipe, end to end, with the public API only.

A new layer is defined here, outside the package: subclass ``galpipe.nn.Layer``, register
it with ``@register(type_name)``, implement ``_build`` / ``forward`` / ``backward`` (and
``flops``).  Nothing else is needed: spec validation, model building, the summary, the
config (``get_config`` from the constructor signature), saving and loading, training and
the gradient check all work from the registry.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from galpipe.errors import ModelError
from galpipe.nn import (
    LAYERS,
    Adam,
    Layer,
    SoftmaxCrossEntropy,
    build_model,
    check_layer_gradients,
    layer_from_spec,
    load_model,
    register,
    save_model,
    summary,
    summary_rows,
)


@register("scaled_swish")
class ScaledSwish(Layer):
    """Per-channel scaled swish: ``y = gamma * x * sigmoid(beta * x)``.

    Parameters
    ----------
    beta : float
        Initial slope of the gate (trainable, one per channel).
    name : str, optional
        Free-form name.

    Notes
    -----
    Any input ``(N, ..., C)``, output of the same shape; parameters ``gamma`` and
    ``beta`` of shape ``(C,)``.
    """

    def __init__(self, beta: float = 1.0, name: str | None = None) -> None:
        super().__init__(name)
        if not isinstance(beta, int | float) or isinstance(beta, bool):
            raise ModelError(f"scaled_swish: beta must be a number, got {beta!r}")
        self.beta = float(beta)
        self._cache: tuple[np.ndarray, np.ndarray] | None = None

    def _build(self, input_shape: tuple[int, ...], rng: np.random.Generator) -> tuple[int, ...]:
        c = input_shape[-1]
        self.params = {"gamma": np.ones(c, dtype=self.dtype),
                       "beta": np.full(c, self.beta, dtype=self.dtype)}
        return input_shape

    def flops(self) -> int:
        return 6 * int(np.prod(self.input_shape)) if self.built else 0

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        self._ensure_built(x)
        s = 0.5 * (1 + np.tanh(0.5 * self.params["beta"] * x))  # sigmoid(beta * x)
        self._cache = (x, s)
        return self.params["gamma"] * x * s

    def backward(self, dout: np.ndarray) -> np.ndarray:
        assert self._cache is not None, "backward before forward"
        x, s = self._cache
        axes = tuple(range(x.ndim - 1))
        gamma, beta = self.params["gamma"], self.params["beta"]
        ds = s * (1 - s)  # d sigmoid / d (beta x)
        self.grads["gamma"][...] = np.sum(dout * x * s, axis=axes)
        self.grads["beta"][...] = np.sum(dout * gamma * x * x * ds, axis=axes)
        return dout * gamma * (s + beta * x * ds)


SPEC = [
    {"type": "conv2d", "filters": 4},
    {"type": "scaled_swish", "beta": 1.5},
    "maxpool2d",
    "flatten",
    {"type": "dense", "units": 8},
    "scaled_swish",
    {"type": "dense", "units": 3},
]


def _data(n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.arange(n) % 3
    x = rng.normal(0, 0.3, (n, 6, 6, 2)).astype(np.float32)
    x[:, :, :, 0] += y[:, None, None] - 1.0  # learnable: the class shifts channel 0
    return x, y


def test_registered_and_validated_from_the_registry() -> None:
    assert LAYERS["scaled_swish"] is ScaledSwish
    layer = layer_from_spec({"type": "scaled_swish", "beta": 2})
    assert layer.get_config() == {"type": "scaled_swish", "beta": 2}
    with pytest.raises(ModelError, match=r"accepted: \['beta', 'name'\]"):
        layer_from_spec({"type": "scaled_swish", "slope": 2})
    with pytest.raises(ModelError, match="did you mean 'scaled_swish'"):
        layer_from_spec({"type": "scaled_swsh"})


def test_model_summary_training_and_persistence(tmp_path) -> None:
    model = build_model(SPEC, (6, 6, 2), seed=0)
    assert "1.scaled_swish.beta" in model.params
    rows = summary_rows(model)
    assert rows[1]["type"] == "scaled_swish" and rows[1]["params"] == 8
    assert rows[1]["flops"] == 6 * 6 * 6 * 4
    assert "scaled_swish" in summary(model)

    x, y = _data()
    opt = Adam(model.params, lr=0.02)
    loss_fn = SoftmaxCrossEntropy()
    losses = []
    for _ in range(30):
        losses.append(loss_fn.forward(model.forward(x, training=True), y))
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step(model.grads)
    assert losses[-1] < 0.5 * losses[0]
    assert not np.allclose(model.params["1.scaled_swish.beta"], 1.5)  # the new layer learns

    save_model(model, tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "model.json").read_text())
    assert doc["architecture"][1] == {"type": "scaled_swish", "beta": 1.5}
    loaded, _ = load_model(tmp_path / "m")
    for k, v in model.params.items():
        np.testing.assert_array_equal(loaded.params[k], v)
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))


def test_gradient_check_float64() -> None:
    x = np.random.default_rng(1).standard_normal((3, 4, 4, 2))
    errors = check_layer_gradients(ScaledSwish(beta=0.7), x)
    assert set(errors) == {"x", "gamma", "beta"}
    assert max(errors.values()) < 1e-6, errors
    net = build_model(SPEC, (6, 6, 2), seed=2, dtype=np.float64)
    errors = check_layer_gradients(net, np.random.default_rng(2).standard_normal((2, 6, 6, 2)))
    assert max(errors.values()) < 1e-6, errors
