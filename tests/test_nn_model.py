"""Sequential / Residual / build_model: specs, naming, errors, summary, determinism, training."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from galpipe.errors import ModelError
from galpipe.nn import (
    Adam,
    Residual,
    Sequential,
    SoftmaxCrossEntropy,
    build_model,
    expand_spec,
    layer_from_spec,
    summary,
    summary_rows,
)

SMALL = [
    {"type": "conv2d", "filters": 4, "kernel_size": 3},
    "relu",
    {"type": "maxpool2d", "pool_size": 2},
    {"type": "conv2d", "filters": 8, "kernel_size": 3, "padding": "valid"},
    "relu",
    "flatten",
    {"type": "dense", "units": 3},
]


def test_parameter_names_shapes_and_live_arrays() -> None:
    model = build_model(SMALL, (8, 8, 3), seed=0)
    params = model.params
    assert list(params) == ["0.conv2d.W", "0.conv2d.b", "3.conv2d.W", "3.conv2d.b",
                            "6.dense.W", "6.dense.b"]
    assert params["0.conv2d.W"].shape == (3, 3, 3, 4)
    assert params["3.conv2d.W"].shape == (3, 3, 4, 8)
    assert params["6.dense.W"].shape == (2 * 2 * 8, 3)
    assert all(p.dtype == np.float32 for p in params.values())
    assert list(model.grads) == list(params)
    # live: modifying the returned array changes the layer
    params["6.dense.b"][...] = 7.0
    assert np.all(model.layers[6].params["b"] == 7.0)
    assert model.input_shape == (8, 8, 3)
    assert model.output_shape == (3,)
    assert model.state == {}


def test_hand_computed_param_count_and_summary_totals() -> None:
    model = build_model(SMALL, (8, 8, 3), seed=0)
    expected = (3 * 3 * 3 * 4 + 4) + (3 * 3 * 4 * 8 + 8) + (32 * 3 + 3)
    assert model.n_params() == expected == 112 + 296 + 99
    rows = summary_rows(model)
    assert [r["layer"] for r in rows][:3] == ["0.conv2d", "1.relu", "2.maxpool2d"]
    assert sum(r["params"] for r in rows) == expected
    assert rows[3]["output_shape"] == (2, 2, 8)
    conv_flops = 8 * 8 * 4 * (2 * 27 + 1)
    assert rows[0]["flops"] == conv_flops
    text = summary(model)
    assert f"total params: {expected:,}" in text
    assert f"forward FLOPs per sample: {sum(r['flops'] for r in rows):,}" in text
    assert "(2, 2, 8)" in text


def test_same_seed_same_weights_other_seed_differs() -> None:
    a = build_model(SMALL, (8, 8, 3), seed=11)
    b = build_model(SMALL, (8, 8, 3), seed=11)
    c = build_model(SMALL, (8, 8, 3), seed=12)
    for k, v in a.params.items():
        np.testing.assert_array_equal(v, b.params[k])
    assert not np.array_equal(a.params["0.conv2d.W"], c.params["0.conv2d.W"])


def test_repeat_expansion() -> None:
    spec = [
        {"repeat": 2, "layers": [{"type": "conv2d", "filters": 4}, "relu"]},
        {"type": "maxpool2d", "repeat": 2},
        {"repeat": 1, "layers": [{"repeat": 2, "layers": ["tanh"]}]},
        "flatten",
    ]
    model = build_model(spec, (8, 8, 1))
    assert [s["type"] for s in model.spec] == [
        "conv2d", "relu", "conv2d", "relu", "maxpool2d", "maxpool2d", "tanh", "tanh", "flatten"
    ]
    assert model.output_shape == (2 * 2 * 4,)
    assert "repeat" not in json.dumps(model.spec)
    with pytest.raises(ModelError, match="repeat"):
        expand_spec([{"repeat": 0, "layers": ["relu"]}])
    with pytest.raises(ModelError, match="repeat"):
        expand_spec([{"repeat": 2}])


def test_model_config_round_trip_through_registry() -> None:
    spec = [*SMALL[:3], {"type": "residual", "body": [{"type": "conv2d", "filters": 6},
                                                     "batchnorm", "relu"],
                         "projection": "auto"},
            "global_avg_pool", {"type": "dropout", "rate": 0.1}, {"type": "dense", "units": 2}]
    model = build_model(spec, (8, 8, 3), seed=4)
    cfg = model.get_config()
    assert cfg["type"] == "sequential"
    clone = layer_from_spec(json.loads(json.dumps(cfg)))
    assert isinstance(clone, Sequential)
    assert clone.get_config() == cfg
    clone.build((8, 8, 3), np.random.default_rng(4))
    for k, v in model.params.items():
        np.testing.assert_array_equal(v, clone.params[k])
    assert "3.residual.proj.0.conv2d.W" in model.params
    assert "3.residual.body.1.batchnorm.running_mean" in model.state


def test_get_config_follows_the_constructor_signature() -> None:
    import inspect

    from galpipe.nn import LAYERS, LayerProtocol, layer_from_spec, register

    args = {"conv2d": {"filters": 2}, "dense": {"units": 2},
            "sequential": None, "residual": None}  # containers: their own config
    for name, cls in LAYERS.items():
        if not cls.__module__.startswith("galpipe.nn.") or args.get(name, {}) is None:
            continue
        layer = layer_from_spec({"type": name, **args.get(name, {})})
        assert isinstance(layer, LayerProtocol)
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "name"}
        cfg = layer.get_config()
        assert set(cfg) == {"type"} | accepted, name
        assert layer_from_spec(cfg).get_config() == cfg
    named = layer_from_spec({"type": "dropout", "rate": 0.25, "name": "drop"})
    assert named.get_config() == {"type": "dropout", "rate": 0.25, "name": "drop"}
    with pytest.raises(ModelError, match="not a subclass of Layer"):
        register("not_a_layer")(object)  # type: ignore[arg-type]


def test_shape_error_names_the_layer_and_shapes() -> None:
    spec = [{"type": "conv2d", "filters": 4}, "relu", {"type": "dense", "units": 3}]
    with pytest.raises(ModelError) as err:
        build_model(spec, (8, 8, 3))
    msg = str(err.value)
    assert msg.startswith("layer 2 (dense)")
    assert "(8, 8, 4)" in msg and "flat" in msg
    with pytest.raises(ModelError, match=r"layer 1 \(conv2d\).*\(5,\)"):
        build_model([{"type": "dense", "units": 5}, {"type": "conv2d", "filters": 2}], (4,))
    with pytest.raises(ModelError, match=r"layer 0 \(maxpool2d\).*larger than the input"):
        build_model([{"type": "maxpool2d", "pool_size": 4}], (3, 3, 1))
    model = build_model(SMALL, (8, 8, 3))
    with pytest.raises(ModelError, match=r"\(N, 8, 8, 3\).*\(2, 8, 8, 4\)"):
        model.forward(np.zeros((2, 8, 8, 4), dtype=np.float32))


def test_unknown_type_and_bad_arguments_list_choices() -> None:
    with pytest.raises(ModelError) as err:
        build_model([{"type": "conv", "filters": 3}], (8, 8, 1))
    assert "layer 0" in str(err.value) and "valid types" in str(err.value)
    assert "conv2d" in str(err.value)
    with pytest.raises(ModelError) as err:
        build_model([{"type": "conv2d", "filter": 3}], (8, 8, 1))
    assert "filter" in str(err.value) and "filters" in str(err.value)
    with pytest.raises(ModelError, match="input_shape"):
        build_model(SMALL, (8, -8, 3))
    with pytest.raises(ModelError, match="list"):
        build_model({"type": "relu"}, (3,))  # type: ignore[arg-type]


def test_residual_identity_projection_and_errors() -> None:
    block = Residual([{"type": "conv2d", "filters": 3}], projection=None)
    block.build((5, 5, 3), np.random.default_rng(0), np.float64)
    x = np.random.default_rng(1).standard_normal((2, 5, 5, 3))
    np.testing.assert_allclose(block.forward(x), block.body.forward(x) + x)
    with pytest.raises(ModelError, match="projection"):
        Residual([{"type": "conv2d", "filters": 4}], projection=None).build((5, 5, 3))
    auto = Residual([{"type": "conv2d", "filters": 4, "stride": 2}], projection="auto")
    assert auto.build((6, 6, 3)) == (3, 3, 4)
    assert auto.proj is not None and auto.proj.layers[0].get_config()["stride"] == 2
    same = Residual(["relu"], projection="auto")
    same.build((4,))
    assert same.proj is None and same.n_params() == 0


def test_set_rng_reseeds_dropout_deterministically() -> None:
    spec = [{"type": "dense", "units": 50}, {"type": "dropout", "rate": 0.5},
            {"type": "dense", "units": 2}]
    model = build_model(spec, (10,), seed=0)
    x = np.ones((8, 10), dtype=np.float32)
    model.set_rng(np.random.default_rng(3))
    a = model.forward(x, training=True)
    b = model.forward(x, training=True)
    model.set_rng(np.random.default_rng(3))
    np.testing.assert_array_equal(model.forward(x, training=True), a)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(model.forward(x), model.forward(x))  # eval: no dropout


def test_backward_without_input_grad_returns_none_and_same_param_grads() -> None:
    model = build_model(SMALL, (8, 8, 3), seed=0)
    x = np.random.default_rng(0).standard_normal((4, 8, 8, 3)).astype(np.float32)
    d = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    model.forward(x, training=True)
    dx = model.backward(d)
    assert dx is not None and dx.shape == x.shape
    grads = {k: g.copy() for k, g in model.grads.items()}
    model.forward(x, training=True)
    assert model.backward(d, input_grad=False) is None
    for k, g in model.grads.items():
        np.testing.assert_array_equal(g, grads[k])


def test_small_convnet_memorises_random_labels() -> None:
    """32 fixed random images with random labels: Adam drives the loss near zero."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 16, 16, 3)).astype(np.float32)
    y = rng.integers(0, 3, 32)
    spec = [
        {"type": "conv2d", "filters": 8}, "relu", "maxpool2d",
        {"type": "conv2d", "filters": 16}, "relu", "maxpool2d",
        "flatten", {"type": "dense", "units": 32}, "relu", {"type": "dense", "units": 3},
    ]
    model = build_model(spec, (16, 16, 3), seed=0)
    opt = Adam(model.params, lr=3e-3)
    loss = SoftmaxCrossEntropy()
    first = None
    for _ in range(150):
        value = loss.forward(model.forward(x, training=True), y)
        first = value if first is None else first
        model.backward(loss.backward(), input_grad=False)
        opt.step(model.grads)
    final = loss.forward(model.forward(x), y)
    assert first > 0.9
    assert final < 0.02
    assert np.all(model.forward(x).argmax(axis=1) == y)


def test_backward_after_inference_forward_matches_training_forward() -> None:
    """Input gradients (saliency) work after forward(training=False) too."""
    model = build_model(SMALL, (8, 8, 3), seed=0)
    x = np.random.default_rng(0).standard_normal((4, 8, 8, 3)).astype(np.float32)
    d = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    model.forward(x, training=False)
    dx_eval = model.backward(d)
    grads_eval = {k: g.copy() for k, g in model.grads.items()}
    model.forward(x, training=True)
    np.testing.assert_array_equal(dx_eval, model.backward(d))
    for k, g in model.grads.items():
        np.testing.assert_array_equal(grads_eval[k], g)


def _forward_in_child(model, x, expected, queue) -> None:  # pragma: no cover - in child
    queue.put(bool(np.array_equal(model.forward(x), expected)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_worker_threads_survive_fork() -> None:
    """A forked child (multiprocessing 'fork') gets a fresh worker pool, no deadlock."""
    import multiprocessing

    from galpipe.nn import set_num_workers

    set_num_workers(2)
    try:
        model = build_model(SMALL, (8, 8, 3), seed=0)
        x = np.random.default_rng(0).standard_normal((64, 8, 8, 3)).astype(np.float32)
        expected = model.forward(x)
        import galpipe.nn.fast.threads as nn_base

        assert nn_base._EXECUTOR is not None  # the parent's worker pool exists
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        proc = ctx.Process(target=_forward_in_child, args=(model, x, expected, queue))
        proc.start()
        proc.join(timeout=60)
        alive = proc.is_alive()
        if alive:
            proc.kill()
        assert not alive, "forward pass in a forked child hung"
        assert queue.get(timeout=5) is True
    finally:
        set_num_workers(None)
