"""save_model / load_model: bit-identical predictions, no pickle, clear errors."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

import galpipe
from galpipe.errors import ModelError
from galpipe.nn import build_model, load_model, read_model_info, save_model

SPEC = [
    {"type": "conv2d", "filters": 4},
    "batchnorm",
    "relu",
    {"type": "maxpool2d", "pool_size": 2},
    {"type": "residual", "body": [{"type": "conv2d", "filters": 6}, "relu"],
     "projection": "auto"},
    "global_avg_pool",
    {"type": "dropout", "rate": 0.2},
    {"type": "dense", "units": 3},
]
#: A pipeline model's metadata (what galpipe.stages.train writes): checked in full on load.
META = {"inputs": "image", "classes": ["elliptical", "spiral", "merger"], "bands": ["g", "r", "i"],
        "image_shape": [8, 8, 3], "features": None,
        "normalisation": {"softening": 0.1, "reference_flux": 100.0, "clip": [-0.5, 1.5], "bad_pixel_value": 0.0},
        "preprocess": {"source": "simulated", "crop_fraction": 1.0, "cutout_size": 8}}


@pytest.fixture()
def trained(tmp_path: Path):
    model = build_model(SPEC, (8, 8, 3), seed=5)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 8, 8, 3)).astype(np.float32)
    model.forward(x, training=True)  # moves the BatchNorm running statistics
    for p in model.params.values():
        p += rng.standard_normal(p.shape).astype(p.dtype) * 0.01
    out = tmp_path / "model"
    save_model(model, out, metadata=META)
    return model, x, out


def test_round_trip_bit_identical(trained) -> None:
    model, x, out = trained
    loaded, meta = load_model(out)
    assert meta == META
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))
    assert loaded.spec == model.spec
    for k, v in model.state.items():
        np.testing.assert_array_equal(loaded.state[k], v)
    assert any(not np.all(b == 0) for b in loaded.state.values())


def test_files_are_plain_json_and_npz(trained) -> None:
    model, _, out = trained
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "weights.npz"]
    doc = json.loads((out / "model.json").read_text())
    assert doc["galpipe_version"] == galpipe.__version__
    assert doc["input_shape"] == [8, 8, 3]
    assert doc["architecture"] == model.spec
    assert doc["metadata"] == META
    assert read_model_info(out)["n_params"] == model.n_params()
    with np.load(out / "weights.npz", allow_pickle=False) as npz:
        keys = set(npz.files)
        assert all(npz[k].dtype == np.float32 for k in keys)
    assert keys == {f"param:{k}" for k in model.params} | {
        f"buffer:{k}" for k in model.state
    }
    # no temporary files left behind by the atomic writes
    assert not list(out.glob("*.tmp"))


def _rewrite_npz(path: Path, edit) -> None:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    edit(arrays)
    np.savez(path, **arrays)


def test_missing_and_unexpected_keys_are_listed(trained) -> None:
    _, _, out = trained
    _rewrite_npz(out / "weights.npz",
                 lambda a: (a.pop("param:7.dense.b"), a.__setitem__("param:99.dense.W",
                                                                    np.zeros(2))))
    with pytest.raises(ModelError) as err:
        load_model(out)
    msg = str(err.value)
    assert "missing keys ['param:7.dense.b']" in msg
    assert "unexpected keys ['param:99.dense.W']" in msg


def test_wrong_shape_is_reported(trained) -> None:
    _, _, out = trained
    _rewrite_npz(out / "weights.npz",
                 lambda a: a.__setitem__("param:0.conv2d.W", np.zeros((3, 3, 3, 5), np.float32)))
    with pytest.raises(ModelError, match=r"0\.conv2d\.W: expected \(3, 3, 3, 4\), got "
                                         r"\(3, 3, 3, 5\)"):
        load_model(out)


def test_pickled_object_arrays_are_refused(trained) -> None:
    _, _, out = trained
    _rewrite_npz(out / "weights.npz",
                 lambda a: a.__setitem__("param:7.dense.b", np.array([{"x": 1}], dtype=object)))
    with pytest.raises(ModelError, match=r"weights\.npz"):
        load_model(out)


def test_missing_files_and_bad_json(tmp_path: Path, trained) -> None:
    _, _, out = trained
    with pytest.raises(ModelError, match=r"model\.json"):
        load_model(tmp_path / "nowhere")
    (out / "weights.npz").unlink()
    with pytest.raises(ModelError, match=r"weights\.npz"):
        load_model(out)
    (out / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model(out)


def test_metadata_must_be_json(tmp_path: Path) -> None:
    model = build_model([{"type": "dense", "units": 2}], (3,))
    with pytest.raises(ModelError, match="JSON"):
        save_model(model, tmp_path / "m", metadata={"x": np.float32(1.0)})


def test_npz_is_a_zip_of_npy_files(trained) -> None:
    _, _, out = trained
    with zipfile.ZipFile(out / "weights.npz") as zf:
        assert all(name.endswith(".npy") for name in zf.namelist())


def test_integer_weights_are_refused_naming_file_and_array(trained) -> None:
    _, _, out = trained
    _rewrite_npz(out / "weights.npz",
                 lambda a: a.__setitem__("param:7.dense.b", np.zeros(3, dtype=np.int32)))
    with pytest.raises(ModelError, match=r"weights\.npz.*dtype mismatches: param:7\.dense\.b: "
                                         r"expected float32, got int32"):
        load_model(out)


def test_one_array_loader_serves_weights_optimizer_and_checkpoints() -> None:
    """galpipe.nn.arrays is the single reader/checker (allow_pickle=False)."""
    import inspect

    import galpipe.nn.optim as optim
    import galpipe.nn.persist as persist
    import galpipe.nn.training as training
    from galpipe.nn.arrays import check_arrays

    for module in (persist, optim, training):
        code = inspect.getsource(module).replace(module.__doc__ or "", "")
        assert "np.load(" not in code and "allow_pickle" not in code
        assert "galpipe.nn.arrays import" in code
    with pytest.raises(ModelError, match=r"opt state does not match.*missing keys \['b'\].*"
                                         r"shape mismatches: a: expected \(2,\), got \(3,\)"):
        check_arrays({"a": np.zeros(3)}, {"a": np.zeros(2), "b": np.zeros(1)}, where="opt state")
