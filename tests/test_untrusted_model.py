"""A model folder is untrusted input: a crafted or damaged one fails with one clear line.

One small real model (``build_model`` + ``save_model`` with the metadata the train
stage writes) is saved once.  Each malformed case copies it, corrupts ``model.json``
or ``weights.npz``, and runs ``galpipe predict``, ``galpipe evaluate`` (a split file,
and an external labelled folder) and ``galpipe summary`` through :func:`galpipe.cli.main`:
every command exits 1 with one line on stderr naming the file and the key, and
nothing is written outside ``--output-dir``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

import galpipe
from galpipe.cli import main
from galpipe.config import build_section
from galpipe.errors import DataError, ModelError
from galpipe.nn.model import build_model
from galpipe.nn.persist import load_model, read_model_info, save_model
from galpipe.stages.evaluate import _figure_path, _galleries
from galpipe.stages.train import full_architecture

CLASSES = ["elliptical", "spiral", "edge_on"]
SIZE = 12
HIDDEN = [{"type": "conv2d", "filters": 3}, "relu", "global_avg_pool"]
N_IMAGES = 9


def _metadata() -> dict[str, Any]:
    """What :func:`galpipe.stages.train.run` writes for an ``images``-source RGB model."""
    return {
        "experiment": "tiny", "description": "", "preset": None, "inputs": "image", "classes": list(CLASSES),
        "bands": ["red", "green", "blue"], "image_shape": [SIZE, SIZE, 3],
        "normalisation": build_section("normalise").to_dict(), "features": None, "training": {},
        "galpipe_version": galpipe.__version__,
        "preprocess": {"source": "images", "crop_fraction": 1.0, "cutout_size": SIZE},
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The valid model, a folder of labelled PNGs and a split file (made by a valid ``evaluate``)."""
    root = tmp_path_factory.mktemp("untrusted")
    model = build_model(full_architecture(HIDDEN, len(CLASSES)), (SIZE, SIZE, 3), seed=1)
    save_model(model, root / "model", metadata=_metadata())
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{100 + i}.png")
        rows.append({"objid": 100 + i, "label": CLASSES[i % 3], "image": f"{100 + i}.png"})
    labels = root / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    out = root / "valid"
    assert main(["evaluate", "--model", str(root / "model"), "--images", str(images), "--labels", str(labels),
                 "--output-dir", str(out), "--n-bootstrap", "2", "--no-tta"]) == 0
    return SimpleNamespace(model=root / "model", images=images, labels=labels, split=out / "external.parquet",
                           out=out, params=list(model.params))


def _commands(model: Path, base: SimpleNamespace, out: Path) -> dict[str, list[str]]:
    common = ["--model", str(model)]
    return {
        "predict": ["predict", *common, str(base.images), "--output", str(out / "predictions.csv")],
        "evaluate-split": ["evaluate", *common, "--test", str(base.split), "--output-dir", str(out / "split"),
                           "--n-bootstrap", "2", "--no-tta"],
        "evaluate-images": ["evaluate", *common, "--images", str(base.images), "--labels", str(base.labels),
                            "--output-dir", str(out / "images"), "--n-bootstrap", "2", "--no-tta"],
        "summary": ["summary", *common],
    }


def _listing(root: Path, out: Path) -> set[Path]:
    return {p for p in root.rglob("*") if out not in p.parents and p != out}


# --------------------------------------------------------------------------- corruptions
def _edit_json(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        doc = json.loads((model / "model.json").read_text())
        edit(doc)
        (model / "model.json").write_text(json.dumps(doc))
    return apply


def _meta(key: str, value: Any) -> Callable[[Path], None]:
    """Set ``metadata.<key>`` (dotted) to ``value``; ``...`` deletes it."""
    def edit(doc: dict[str, Any]) -> None:
        *parents, last = key.split(".")
        node = doc["metadata"]
        for p in parents:
            node = node[p]
        if value is ...:
            del node[last]
        else:
            node[last] = value
    return _edit_json(edit)


def _edit_npz(edit: Callable[[dict[str, np.ndarray]], None]) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        with np.load(model / "weights.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        edit(arrays)
        np.savez(model / "weights.npz", **arrays)
    return apply


def _truncate(model: Path) -> None:
    data = (model / "weights.npz").read_bytes()
    (model / "weights.npz").write_bytes(data[: len(data) // 2])


def _first(arrays: dict[str, np.ndarray]) -> str:
    return sorted(k for k in arrays if k.startswith("param:"))[0]


def _nan(arrays: dict[str, np.ndarray]) -> None:
    arrays[_first(arrays)].flat[0] = np.nan


def _inf(arrays: dict[str, np.ndarray]) -> None:
    arrays[_first(arrays)].flat[-1] = np.inf


def _reshape(arrays: dict[str, np.ndarray]) -> None:
    arrays[_first(arrays)] = np.zeros((2, 2), np.float32)


def _extra(arrays: dict[str, np.ndarray]) -> None:
    arrays["param:99.dense.W"] = np.zeros(3, np.float32)


def _missing(arrays: dict[str, np.ndarray]) -> None:
    del arrays[_first(arrays)]


def _object(arrays: dict[str, np.ndarray]) -> None:
    arrays[_first(arrays)] = np.array([{"x": 1}], dtype=object)


def _nan_literal(model: Path) -> None:
    text = (model / "model.json").read_text().replace('"crop_fraction": 1.0', '"crop_fraction": NaN')
    assert "NaN" in text
    (model / "model.json").write_text(text)


NORM = build_section("normalise").to_dict()
#: (case, corruption, file named in the message, text the message must contain)
CASES: list[tuple[str, Callable[[Path], None], str, str]] = [
    ("missing-classes", _meta("classes", ...), "model.json", "key 'classes'"),
    ("wrong-length-classes", _meta("classes", CLASSES[:2]), "model.json", "key 'classes'"),
    ("duplicate-classes", _meta("classes", ["a", "a", "b"]), "model.json", "key 'classes'"),
    ("unsafe-class", _meta("classes", ["../PWNED", "spiral", "edge_on"]), "model.json", "key 'classes[0]'"),
    ("traversing-class", _meta("classes", ["e", "s", "/../../../../PWNED_x"]), "model.json", "key 'classes[2]'"),
    ("class-not-string", _meta("classes", [1, 2, 3]), "model.json", "key 'classes[0]'"),
    ("string-image-shape", _meta("image_shape", "12,12,3"), "model.json", "key 'image_shape'"),
    ("huge-image-shape", _meta("image_shape", [10**9, 10**9, 3]), "model.json", "key 'image_shape'"),
    ("image-shape-not-the-network", _meta("image_shape", [16, 16, 3]), "model.json", "key 'image_shape'"),
    ("crop-1e9", _meta("preprocess.crop_fraction", 1e9), "model.json", "key 'preprocess.crop_fraction'"),
    ("crop-minus-3", _meta("preprocess.crop_fraction", -3), "model.json", "key 'preprocess.crop_fraction'"),
    ("crop-string", _meta("preprocess.crop_fraction", "1"), "model.json", "key 'preprocess.crop_fraction'"),
    ("crop-nan", _nan_literal, "model.json", "not valid JSON"),
    ("cutout-size-1e9", _meta("preprocess.cutout_size", 10**9), "model.json", "key 'preprocess.cutout_size'"),
    ("unknown-source", _meta("preprocess.source", "../x"), "model.json", "key 'preprocess.source'"),
    ("reversed-clip", _meta("normalisation.clip", [1.5, -0.5]), "model.json", "key 'normalisation.clip'"),
    ("zero-softening", _meta("normalisation.softening", 0), "model.json", "key 'normalisation.softening'"),
    ("incomplete-normalisation", _meta("normalisation", {"softening": 1.0}), "model.json", "key 'normalisation'"),
    ("bad-inputs", _meta("inputs", "pixels"), "model.json", "key 'inputs'"),
    ("features-without-features", _meta("inputs", "features"), "model.json", "key 'features'"),
    ("bands-not-channels", _meta("bands", ["g", "r"]), "model.json", "key 'bands'"),
    ("string-input-shape", _edit_json(lambda d: d.__setitem__("input_shape", "12")), "model.json",
     "key 'input_shape'"),
    ("object-dtype", _edit_json(lambda d: d.__setitem__("dtype", "object")), "model.json", "key 'dtype'"),
    ("bad-architecture", _edit_json(lambda d: d["architecture"][0].__setitem__("filters", "x")), "model.json",
     "key 'architecture'"),
    ("huge-architecture", _edit_json(lambda d: d["architecture"][-1].__setitem__("units", 10**12)), "model.json",
     "key 'architecture'"),
    ("truncated-weights", _truncate, "weights.npz", "not a readable .npz"),
    ("garbage-weights", lambda m: (m / "weights.npz").write_bytes(b"PK\x03\x04garbage"), "weights.npz",
     "not a readable .npz"),
    ("nan-weights", _edit_npz(_nan), "weights.npz", "NaN or infinite"),
    ("inf-weights", _edit_npz(_inf), "weights.npz", "NaN or infinite"),
    ("wrong-array-shape", _edit_npz(_reshape), "weights.npz", "shape mismatches"),
    ("extra-array", _edit_npz(_extra), "weights.npz", "unexpected keys ['param:99.dense.W']"),
    ("missing-array", _edit_npz(_missing), "weights.npz", "missing keys"),
    ("pickled-array", _edit_npz(_object), "weights.npz", "dtype mismatches"),
]


@pytest.mark.parametrize(("case", "corrupt", "filename", "text"), CASES, ids=[c[0] for c in CASES])
def test_malformed_model_fails_with_one_line_and_writes_nothing_outside(
    tmp_path: Path, base: SimpleNamespace, capsys: pytest.CaptureFixture[str],
    case: str, corrupt: Callable[[Path], None], filename: str, text: str,
) -> None:
    model = tmp_path / "model"
    shutil.copytree(base.model, model)
    corrupt(model)
    out = tmp_path / "out"
    before = _listing(tmp_path, out)
    for name, argv in _commands(model, base, out).items():
        capsys.readouterr()
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 1, f"{case}: {name} returned {rc}"
        assert "\n" not in err and "Traceback" not in err, f"{case}: {name}: {err}"
        assert err.startswith(f"galpipe {argv[0]}: error: "), err
        assert str(model / filename) in err and text in err, f"{case}: {name}: {err}"
    assert _listing(tmp_path, out) == before, f"{case}: files written outside --output-dir"
    assert not [p for p in tmp_path.parent.rglob("*PWNED*") if out not in p.parents]


def test_valid_model_loads_predicts_and_evaluates(tmp_path: Path, base: SimpleNamespace,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    for name, argv in _commands(base.model, base, out).items():
        if name == "evaluate-images":
            continue  # the fixture ran it (it made the split file)
        assert main(argv) == 0, f"{name}: {capsys.readouterr().err}"
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == N_IMAGES and set(preds["pred"]) <= set(CLASSES)
    p = preds[[f"p_{c}" for c in CLASSES]].to_numpy()
    assert np.isfinite(p).all() and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert (out / "split" / "figures" / "confusion_matrix.png").is_file()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"]
    model, meta = load_model(base.model)
    assert meta["classes"] == CLASSES and model.output_shape == (len(CLASSES),)


def test_library_models_without_pipeline_metadata_still_load(tmp_path: Path) -> None:
    """A bare network (no metadata, or metadata of its own) is not a pipeline model."""
    model = build_model([{"type": "dense", "units": 2}], (3,), seed=0)
    for meta in (None, {"note": "mine"}):
        save_model(model, tmp_path / "m", metadata=meta)
        assert load_model(tmp_path / "m")[1] == (meta or {})
        with pytest.raises(ModelError, match=r"model .*model\.json: key 'inputs': missing"):
            load_model(tmp_path / "m", pipeline=True)
    save_model(model, tmp_path / "m", metadata={"classes": ["a", "b"]})  # a pipeline key: checked in full
    with pytest.raises(ModelError, match="key 'inputs': missing"):
        read_model_info(tmp_path / "m")


def test_figure_writer_refuses_paths_outside_its_folder(tmp_path: Path, base: SimpleNamespace) -> None:
    """Defence in depth: even past model validation, a gallery never leaves the figures folder."""
    fig = tmp_path / "figures"
    fig.mkdir()
    assert _figure_path(fig, "gallery_correct_spiral.png") == fig / "gallery_correct_spiral.png"
    for name in ("../PWNED.png", "a/../../PWNED.png", "/tmp/PWNED.png"):
        with pytest.raises(DataError, match="leaves the figures folder"):
            _figure_path(fig, name)
    (fig / "gallery_correct_link.png").symlink_to(tmp_path / "elsewhere.png")
    with pytest.raises(DataError, match="leaves the figures folder"):
        _figure_path(fig, "gallery_correct_link.png")
    y = pq.read_table(base.split, columns=["label_index"]).column(0).to_numpy()
    proba = np.eye(len(CLASSES))[y]  # every galaxy right: a gallery per class
    with pytest.raises(DataError, match=r"class name '\.\./\.\./PWNED'"):
        _galleries(base.split, y, proba, ["../../PWNED", "spiral", "edge_on"], ["red", "green", "blue"], 2, fig)
    assert not list(tmp_path.parent.rglob("*PWNED*"))
    _galleries(base.split, y, proba, CLASSES, ["red", "green", "blue"], 2, fig)
    assert {p.name for p in fig.glob("gallery_correct_*.png")} >= {f"gallery_correct_{c}.png" for c in CLASSES}


def test_feature_model_metadata_is_checked_against_the_network(tmp_path: Path) -> None:
    model = build_model(full_architecture([{"type": "dense", "units": 5}, "relu"], len(CLASSES)), (4,), seed=0)
    feats = {"names": ["a", "b", "c", "d"], "mean": [0.0] * 4, "std": [1.0] * 4}
    meta = {**_metadata(), "inputs": "features", "features": feats}
    save_model(model, tmp_path / "m", metadata=meta)
    assert load_model(tmp_path / "m", pipeline=True)[1]["features"] == feats
    for key, bad, text in (("names", ["a", "b", "c"], "features.names"), ("std", [1.0, 0.0, 1.0, 1.0], "features.std"),
                           ("mean", [0.0] * 3, "features.mean")):
        save_model(model, tmp_path / "m", metadata={**meta, "features": {**feats, key: bad}})
        with pytest.raises(ModelError, match=rf"model .*model\.json: key '{text}'"):
            load_model(tmp_path / "m")
