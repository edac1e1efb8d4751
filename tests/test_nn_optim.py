"""Optimisers (hand-computed steps), state dicts, clipping and learning-rate schedules."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from galpipe.errors import ConfigError, ModelError
from galpipe.nn import SGD, Adam, AdamW, clip_grad_norm, make_optimizer, make_schedule


def _params() -> dict[str, np.ndarray]:
    return {"W": np.array([[1.0, -2.0]]), "b": np.array([0.5])}


def _grads() -> dict[str, np.ndarray]:
    return {"W": np.array([[0.1, 0.2]]), "b": np.array([-0.3])}


def test_sgd_plain_and_weight_decay_skips_biases() -> None:
    p = _params()
    SGD(p, lr=0.1, weight_decay=0.5).step(_grads())
    # W: w - lr * (g + wd * w); b (1-D): no decay
    np.testing.assert_allclose(p["W"], [[1.0 - 0.1 * (0.1 + 0.5), -2.0 - 0.1 * (0.2 - 1.0)]])
    np.testing.assert_allclose(p["b"], [0.5 + 0.03])


def test_sgd_momentum_two_steps() -> None:
    p = _params()
    opt = SGD(p, lr=0.1, momentum=0.9)
    opt.step(_grads())
    opt.step(_grads())
    # v1 = g; v2 = 0.9 g + g = 1.9 g; total update = lr * (1 + 1.9) g
    np.testing.assert_allclose(p["W"], [[1.0 - 0.29 * 0.1, -2.0 - 0.29 * 0.2]])
    np.testing.assert_allclose(p["b"], [0.5 + 0.29 * 0.3])


def test_sgd_nesterov_two_steps() -> None:
    p = _params()
    opt = SGD(p, lr=0.1, momentum=0.9, nesterov=True)
    opt.step(_grads())
    opt.step(_grads())
    # step 1: v = g, update g + 0.9 g = 1.9 g; step 2: v = 1.9 g, update g + 0.9*1.9 g = 2.71 g
    np.testing.assert_allclose(p["b"], [0.5 + 0.1 * (1.9 + 2.71) * 0.3])
    with pytest.raises(ModelError, match="nesterov"):
        SGD(_params(), lr=0.1, nesterov=True)


def test_adam_hand_computed_steps() -> None:
    p = {"w": np.array([[1.0, 2.0]])}
    opt = Adam(p, lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    g1, g2 = np.array([[0.5, -1.0]]), np.array([[0.1, 0.3]])
    opt.step({"w": g1})
    # first step: m_hat = g, v_hat = g^2 -> update lr * g / (|g| + eps) = lr * sign(g)
    np.testing.assert_allclose(p["w"], [[1.0 - 0.01, 2.0 + 0.01]], rtol=1e-7)
    opt.step({"w": g2})
    m = 0.9 * 0.1 * g1 + 0.1 * g2
    v = 0.999 * 0.001 * g1**2 + 0.001 * g2**2
    m_hat, v_hat = m / (1 - 0.9**2), v / (1 - 0.999**2)
    p1 = np.array([[1.0, 2.0]]) - 0.01 * g1 / (np.abs(g1) + 1e-8)
    expected = p1 - 0.01 * m_hat / (np.sqrt(v_hat) + 1e-8)
    np.testing.assert_allclose(p["w"], expected, rtol=1e-10)


def test_adam_l2_vs_adamw_decoupled_decay() -> None:
    p1, p2 = _params(), _params()
    Adam(p1, lr=0.1, weight_decay=0.5).step(_grads())
    AdamW(p2, lr=0.1, weight_decay=0.5).step(_grads())
    # Adam: L2 enters the gradient, first step is lr * sign(g + wd w)
    np.testing.assert_allclose(p1["W"], [[1.0 - 0.1, -2.0 + 0.1]], rtol=1e-6)
    # AdamW: w *= 1 - lr wd, then lr * sign(g)
    np.testing.assert_allclose(p2["W"], [[0.95 - 0.1, -1.9 - 0.1]], rtol=1e-6)
    # biases never decayed: both just move by lr * sign(g)
    np.testing.assert_allclose(p1["b"], [0.6], rtol=1e-6)
    np.testing.assert_allclose(p2["b"], [0.6], rtol=1e-6)


def test_step_lr_override_and_float32_in_place() -> None:
    w = np.ones((2, 2), dtype=np.float32)
    opt = SGD({"w": w}, lr=1.0)
    opt.step({"w": np.full((2, 2), 0.5, dtype=np.float32)}, lr=0.1)
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, 0.95)
    with pytest.raises(ModelError, match="missing"):
        opt.step({})


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_state_dict_round_trip_through_npz(name: str) -> None:
    kwargs = {"lr": 0.05, "momentum": 0.9} if name == "sgd" else {"lr": 0.05}
    p_a = _params()
    a = make_optimizer(name, p_a, **kwargs)
    for _ in range(3):
        a.step(_grads())
    buf = io.BytesIO()
    np.savez(buf, **a.state_dict())
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as npz:
        state = {k: npz[k] for k in npz.files}
    assert state["step"].shape == ()
    p_b = {k: v.copy() for k, v in p_a.items()}
    b = make_optimizer(name, p_b, **kwargs)
    b.load_state_dict(state)
    for _ in range(2):
        a.step(_grads())
        b.step(_grads())
    for k in p_a:
        np.testing.assert_array_equal(p_a[k], p_b[k])
    bad = dict(state)
    bad.pop("step")
    bad["extra"] = np.zeros(1)
    with pytest.raises(ModelError) as err:
        b.load_state_dict(bad)
    assert "missing keys ['step']" in str(err.value) and "unexpected keys ['extra']" in str(
        err.value
    )


def test_make_optimizer_errors_list_valid_names() -> None:
    with pytest.raises(ModelError) as err:
        make_optimizer("rmsprop", _params())
    assert "adam" in str(err.value) and "sgd" in str(err.value) and "adamw" in str(err.value)
    with pytest.raises(ModelError, match="momentum"):
        make_optimizer("adam", _params(), momentum=0.9)
    with pytest.raises(ModelError, match="lr"):
        make_optimizer("sgd", _params())


def test_clip_grad_norm_global_in_place() -> None:
    grads = {"a": np.array([3.0]), "b": np.array([[4.0]])}
    norm = clip_grad_norm(grads, 1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(grads["a"], [0.6])
    np.testing.assert_allclose(grads["b"], [[0.8]])
    small = {"a": np.array([0.3])}
    assert clip_grad_norm(small, 1.0) == pytest.approx(0.3)
    np.testing.assert_allclose(small["a"], [0.3])
    with pytest.raises(ModelError):
        clip_grad_norm(grads, 0.0)


def test_schedules_values() -> None:
    const = make_schedule(None, 0.1, total_steps=100, steps_per_epoch=10)
    assert const(0) == const(99) == 0.1
    step = make_schedule({"type": "step", "step_size": 3, "gamma": 0.5}, 0.2, 100, 10)
    assert step(0) == step(29) == pytest.approx(0.2)
    assert step(30) == pytest.approx(0.1)
    assert step(65) == pytest.approx(0.05)
    cos = make_schedule({"type": "cosine", "min_lr": 0.01}, 0.1, total_steps=100,
                        steps_per_epoch=10)
    assert cos(0) == pytest.approx(0.1)
    assert cos(50) == pytest.approx(0.01 + 0.5 * 0.09)
    assert cos(100) == pytest.approx(0.01)
    warm = make_schedule({"type": "cosine", "warmup_epochs": 2}, 0.1, total_steps=120,
                         steps_per_epoch=10)
    assert warm(0) == pytest.approx(0.1 / 20)
    assert warm(9) == pytest.approx(0.1 * 10 / 20)
    assert warm(19) == pytest.approx(0.1)
    assert warm(20) == pytest.approx(0.1)
    assert warm(70) == pytest.approx(0.05)
    assert warm(120) == pytest.approx(0.0)
    wstep = make_schedule({"type": "step", "step_size": 1, "gamma": 0.1, "warmup_epochs": 1},
                          1.0, 100, 4)
    assert [wstep(s) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.1])
    assert math.isclose(make_schedule({"type": "constant", "warmup_epochs": 1}, 1.0, 10, 2)(0),
                        0.5)


def test_schedule_errors() -> None:
    with pytest.raises(ConfigError, match="valid: constant, cosine, step"):
        make_schedule({"type": "linear"}, 0.1, 10, 1)
    with pytest.raises(ConfigError, match="step_sise"):
        make_schedule({"type": "step", "step_sise": 2}, 0.1, 10, 1)
    with pytest.raises(ConfigError, match="gamma"):
        make_schedule({"type": "step", "gamma": -1}, 0.1, 10, 1)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_large_parameter_split_over_workers_is_identical(name: str) -> None:
    from galpipe.nn import set_num_workers

    rng = np.random.default_rng(0)
    big = rng.standard_normal((600, 400)).astype(np.float32)  # 240k elements: split path
    grads = [rng.standard_normal(big.shape).astype(np.float32) for _ in range(3)]
    kwargs = {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.1} if name == "sgd" else {
        "lr": 0.01, "weight_decay": 0.1}
    results = []
    for workers in (1, 2):
        set_num_workers(workers)
        try:
            params = {"W": big.copy(), "b": np.zeros(400, dtype=np.float32)}
            opt = make_optimizer(name, params, **kwargs)
            for g in grads:
                opt.step({"W": g, "b": g[0]})
        finally:
            set_num_workers(None)
        results.append(params)
    np.testing.assert_array_equal(results[0]["W"], results[1]["W"])
    np.testing.assert_array_equal(results[0]["b"], results[1]["b"])
    # and the split path matches the small-array path on the same values
    small = {"W": big[:2].copy()}
    opt = make_optimizer(name, small, **kwargs)
    for g in grads:
        opt.step({"W": g[:2]})
    np.testing.assert_allclose(results[0]["W"][:2], small["W"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("adam", {"weight_decay": 0.1}), ("adamw", {}), ("sgd", {"lr": 0.1, "momentum": 0.9,
                                                              "weight_decay": 0.05})],
)
def test_flat_buffers_update_identically_to_per_parameter(name: str, kwargs: dict) -> None:
    """flatten_parameters: params/grads become views of one buffer each, the optimiser takes
    the flat path, and every step is bit-identical to the per-parameter updates."""
    from galpipe.nn import build_model, flatten_parameters
    from galpipe.nn.optim import flat_buffer

    spec = [{"type": "conv2d", "filters": 3}, "relu", "flatten", {"type": "dense", "units": 2}]
    flat_model, plain_model = (build_model(spec, (4, 4, 2), seed=3) for _ in range(2))
    flat_p, flat_g = flatten_parameters(flat_model)
    for k, p in plain_model.params.items():
        np.testing.assert_array_equal(flat_model.params[k], p)
        assert np.shares_memory(flat_model.params[k], flat_p)
        assert np.shares_memory(flat_model.grads[k], flat_g)
    flat_opt = make_optimizer(name, flat_model.params, **kwargs)
    plain_opt = make_optimizer(name, plain_model.params, **kwargs)
    assert flat_opt.flat is flat_p and plain_opt.flat is None
    x = np.random.default_rng(0).standard_normal((5, 4, 4, 2)).astype(np.float32)
    for _ in range(3):
        for model, opt in ((flat_model, flat_opt), (plain_model, plain_opt)):
            y = model.forward(x, training=True)
            model.backward(np.ones_like(y) * 0.1)
            opt.step(model.grads)
        assert flat_buffer(flat_model.grads) is flat_g  # layers wrote into the flat grads
        for k, p in plain_model.params.items():
            np.testing.assert_array_equal(flat_model.params[k], p)
    state = flat_opt.state_dict()
    for k, v in plain_opt.state_dict().items():
        np.testing.assert_array_equal(state[k], v)
    flat_opt.load_state_dict(plain_opt.state_dict())  # per-key views of the flat slots
