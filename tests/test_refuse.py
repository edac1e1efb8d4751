"""Refuse before any job runs (issue "Truthful cache"): configurations that cannot give a
meaningful result fail at validation (``validate_config``, which ``galpipe validate-config`` and
the Snakefile call) or in ``check_architectures`` (called by both too), naming the key, file or
rows; the split stage refuses a split that lost a class at run time.  Nothing here runs a job.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from galpipe.cli import main as cli_main
from galpipe.config import build_section, resolve_experiments, validate_config
from galpipe.errors import ConfigError, DataError, ModelError
from galpipe.nn.model import build_model, count_layers, estimate_model, expand_spec
from galpipe.stages.split import assign_splits, check_split_counts, split_dataset
from galpipe.stages.train import check_architectures, full_architecture


# --------------------------------------------------------------------------- helpers
def _images(tmp_path: Path, labels: list[str], *, kinds: list[str] | None = None,
            same: dict[int, int] | None = None, same_file: dict[int, int] | None = None) -> dict:
    """A folder of distinct small images and a labels CSV (ids 1..n); ``same``: row i copies row j's
    bytes; ``same_file``: row i names row j's file; ``kinds``: suffix per row."""
    img = tmp_path / "img"
    img.mkdir()
    rows = []
    for i, lab in enumerate(labels):
        suffix = (kinds or ["png"] * len(labels))[i]
        name = f"g{i}.{suffix}"
        if same_file and i in same_file:
            name = f"g{same_file[i]}.{suffix}"
        elif same and i in same:
            (img / name).write_bytes((img / f"g{same[i]}.{suffix}").read_bytes())
        elif suffix == "fits":
            from astropy.io import fits

            fits.PrimaryHDU(np.full((8, 8), float(i), np.float32)).writeto(img / name)
        else:
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(img / name)
        rows.append(f"{i + 1},{lab},{name}")
    (tmp_path / "labels.csv").write_text("objid,label,image\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return {"source": "images", "images": {"directory": str(img), "labels_csv": str(tmp_path / "labels.csv")}}


def _refused(config: dict, error: type[Exception], *fragments: str) -> str:
    with pytest.raises(error) as info:
        validate_config(config)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, msg
    return msg


# --------------------------------------------------------------------------- 1. empty splits
def test_simulated_too_few_galaxies_is_refused_at_validation() -> None:
    msg = _refused({"simulated": {"n_galaxies": 3}}, ConfigError, "config key 'simulated.n_galaxies'",
                   "class 'elliptical' would have 1 galaxies", "validation split")
    assert "at least 3" in msg
    # 8 shards for 5 galaxies: the splits, not the shards, are what is refused
    _refused({"shards": 8, "simulated": {"n_galaxies": 5}}, ConfigError, "config key 'simulated.n_galaxies'")
    # a class asked for (weight > 0) that the rounding leaves without galaxies
    _refused({"simulated": {"n_galaxies": 100, "class_fractions": {"edge_on": 0.001}}}, ConfigError,
             "config key 'simulated.n_galaxies'", "class 'edge_on' would have 0 galaxies")
    # a shard may be empty; every split still gets every class
    assert validate_config({"shards": 16, "simulated": {"n_galaxies": 9}})["shards"] == 16


def test_images_too_few_labelled_rows_is_refused_at_validation(tmp_path: Path) -> None:
    cfg = _images(tmp_path, ["a", "a", "a", "b", "b"])
    _refused(cfg, ConfigError, "config key 'images.labels_csv'", "class 'b' would have 2 labelled rows",
             str(tmp_path / "labels.csv"))


def test_sdss_too_few_objects_per_class_is_refused_at_validation() -> None:
    _refused({"source": "sdss", "sdss": {"selection": {"n_per_class": 2}}}, ConfigError,
             "config key 'sdss.selection.n_per_class'", "would have 2 objects")


def test_split_stage_refuses_a_split_without_a_class(tmp_path: Path) -> None:
    """At run time (galaxies rejected by cutouts/normalise) the split stage refuses, naming split and class."""
    labels = np.array(["a"] * 10 + ["b"] * 2)
    objid = np.arange(1, 13, dtype=np.int64)
    fr = {"train": 0.7, "validation": 0.15, "test": 0.15}
    with pytest.raises(DataError, match=r"the (validation|test) split would have no galaxy of class 'b'"):
        check_split_counts(labels, assign_splits(objid, labels, fr, seed=1), ["a", "b"])
    # through split_dataset: refused before any output is written
    tbl = pa.table({"objid": objid, "label": labels.tolist(), "pixels": [b"\0"] * 12})
    meta = {b"galpipe.image_shape": b"[1, 1, 1]", b"galpipe.bands": b"[\"g\"]"}
    shard = tmp_path / "n0.parquet"
    pq.write_table(tbl.replace_schema_metadata(meta), shard)
    outs = {s: tmp_path / f"{s}.parquet" for s in ("train", "validation", "test")}
    with pytest.raises(DataError, match=r"split would have no galaxy of class 'b' \(2 'b' galaxies in all"):
        split_dataset([shard], outs, fractions=fr, seed=1)
    assert not any(p.exists() for p in outs.values())


# --------------------------------------------------------------------------- 2. one class
def test_a_single_class_is_refused_for_every_source(tmp_path: Path) -> None:
    _refused({"simulated": {"class_fractions": {"spiral": 0, "edge_on": 0}}}, ConfigError,
             "config key 'simulated.class_fractions'", "['elliptical']")
    _refused(_images(tmp_path, ["a"] * 6), ConfigError, "config key 'images.labels_csv'", "only class 'a'")
    _refused({"source": "sdss", "sdss": {"labels": {"classes": ["spiral"]}}}, ConfigError,
             "config key 'sdss.labels.classes'", "only class 'spiral'")


# --------------------------------------------------------------------------- 3. one image twice
def test_two_ids_naming_the_same_file_are_refused(tmp_path: Path) -> None:
    cfg = _images(tmp_path, ["a", "a", "a", "b", "b", "b", "b"], same_file={6: 3})
    _refused(cfg, DataError, "labels.csv: rows [5, 8] (ids [4, 7]) name the same image", "g3.png")


def test_two_files_with_identical_content_are_refused(tmp_path: Path) -> None:
    cfg = _images(tmp_path, ["a", "a", "a", "b", "b", "b", "b"], same={6: 2})
    msg = _refused(cfg, DataError, "labels.csv", "identical content (sha256)", "id 3: ", "id 7: ")
    assert "g2.png" in msg and "g6.png" in msg
    # the catalogue stage refuses it too (build_catalogue), whoever calls it
    from galpipe.sources.images import build_catalogue

    with pytest.raises(DataError, match="identical content"):
        build_catalogue(cfg["images"])


# --------------------------------------------------------------------------- 4. size caps
def _arch_cfg(arch: list, **limits: int) -> tuple[dict, dict]:
    cfg = validate_config({"cutout_size": 64, "limits": limits,
                           "experiments": {"huge": {"architecture": arch}}})
    return cfg, resolve_experiments(cfg, [])


def test_a_huge_dense_layer_is_refused_without_allocating() -> None:
    cfg, exps = _arch_cfg(["flatten", {"type": "dense", "units": 1_000_000_000}])
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        check_architectures(cfg, exps)
    assert time.perf_counter() - t0 < 2.0
    msg = str(info.value)
    assert "config key 'experiments.huge.architecture'" in msg and "layer 1 (dense)" in msg
    assert f"{64 * 64 * 3 * 10**9 + 10**9:,} parameters" in msg and "limits.max_parameters = 50,000,000" in msg


def test_activation_memory_cap(tmp_path: Path) -> None:
    cfg, exps = _arch_cfg([{"type": "conv2d", "filters": 4096}, "global_avg_pool"])
    with pytest.raises(ConfigError, match=r"layer 0 \(conv2d\), output \(64, 64, 4096\), needs 4,096\.0 MiB .* "
                                          r"batch of 64 \(training\.batch_size\).*limits\.max_activation_mb = 2048"):
        check_architectures(cfg, exps)
    assert estimate_model(full_architecture(exps["huge"]["architecture"], 2), (64, 64, 3))[0].n_params == 114_688
    small = validate_config({**cfg, "training": {"batch_size": 8}})
    check_architectures(small, resolve_experiments(small, []))  # 8 images fit under the default cap


def test_a_huge_repeat_is_refused_before_expanding() -> None:
    cfg, exps = _arch_cfg([{"type": "relu", "repeat": 100_000_000}])
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"experiments\.huge\.architecture'.*100,000,001 layers .*"
                                          r"limits\.max_layers = 1,000"):
        check_architectures(cfg, exps)
    assert time.perf_counter() - t0 < 2.0
    nested = [{"repeat": 10_000, "layers": [{"repeat": 10_000, "layers": ["relu"]}]}]
    assert count_layers(nested) == 10**8
    with pytest.raises(ModelError, match=r"10+ layers .*limits\.max_layers"):
        expand_spec(nested)  # the library's own cap, even without a config


def test_estimates_agree_with_built_models() -> None:
    arch = [{"type": "conv2d", "filters": 8, "stride": 2}, {"type": "batchnorm"}, "relu",
            {"type": "residual", "body": [{"type": "conv2d", "filters": 16}, "relu"]},
            {"type": "maxpool2d"}, {"repeat": 2, "layers": [{"type": "conv2d", "filters": 16, "padding": "valid"}]},
            "flatten", {"type": "dropout", "rate": 0.5}, {"type": "dense", "units": 5}]
    model = build_model(arch, (20, 20, 3))
    est = estimate_model(arch, (20, 20, 3))
    assert sum(e.n_params for e in est) == model.n_params()
    assert [e.output_shape for e in est] == [layer.output_shape for layer in model.layers]


# --------------------------------------------------------------------------- 5. n_bootstrap
def test_n_bootstrap_zero_is_refused() -> None:
    _refused({"evaluate": {"n_bootstrap": 0}}, ConfigError, "config key 'evaluate.n_bootstrap'")


# --------------------------------------------------------------------------- 6. mixed kinds
def test_mixed_fits_and_jpeg_folder_is_refused_with_counts(tmp_path: Path) -> None:
    cfg = _images(tmp_path, ["a", "b"] * 4, kinds=["png"] * 5 + ["fits"] * 3)
    _refused(cfg, DataError, "mixes 3 FITS image(s)", "with 5 JPEG/PNG image(s)", "config key 'images.directory'")


# --------------------------------------------------------------------------- through the CLI
def test_validate_config_command_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"simulated": {"n_galaxies": 3}}), encoding="utf-8")
    assert cli_main(["validate-config", "--config", str(cfg)]) != 0
    assert "simulated.n_galaxies" in capsys.readouterr().err
    cfg.write_text(json.dumps({"experiments": {"big": {"architecture": ["flatten", {"type": "dense",
                                                                                    "units": 10**9}]}}}))
    assert cli_main(["validate-config", "--config", str(cfg)]) != 0
    assert "limits.max_parameters" in capsys.readouterr().err
    assert build_section("limits") == {"max_parameters": 50_000_000, "max_activation_mb": 2048, "max_layers": 1000}
