"""Config validation: defaults filled, bad values rejected naming the key."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from galpipe.config import (
    deep_merge,
    fingerprint,
    load_config,
    load_schema,
    resolve_experiments,
    validate_config,
)
from galpipe.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_default_config_file_is_valid_and_complete() -> None:
    cfg = load_config(REPO / "config" / "config.yaml")
    assert cfg["source"] == "simulated"
    assert cfg["bands"] == ["g", "r", "i"]
    assert cfg["split"]["fractions"] == {"train": 0.7, "validation": 0.15, "test": 0.15}
    assert "small_cnn" in cfg["experiments"]


def test_the_merged_schema_is_valid_json_schema() -> None:
    """load_schema() leaves the metaschema check to this test (it cost every process ~0.3 s)."""
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema == yaml.safe_load(yaml.safe_dump(schema))  # plain YAML types: same under both loaders
    assert "sdss" in schema["properties"] and schema["properties"]["sdss"]["default"] == {}


def test_empty_config_gets_every_default() -> None:
    cfg = validate_config({})
    assert cfg["shards"] == 4 and cfg["cutout_size"] == 64 and cfg["seed"] == 42
    assert cfg["simulated"]["region"]["ra_min"] == 150.0
    assert cfg["training"]["schedule"]["type"] == "cosine"
    assert cfg["evaluate"]["n_bootstrap"] == 1000


def test_schema_documents_every_key() -> None:
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())

    def walk(node: dict, path: str) -> None:
        for name, sub in node.get("properties", {}).items():
            assert "description" in sub, f"{path}.{name} has no description"
            assert "default" in sub, f"{path}.{name} has no default"
            walk(sub, f"{path}.{name}")

    walk(schema, "config")
    walk(schema["$defs"]["training"], "training")


@pytest.mark.parametrize(
    ("bad", "key"),
    [
        ({"shards": "four"}, "shards"),
        ({"shards": 0}, "shards"),
        ({"seed": -1}, "seed"),
        ({"bands": ["g", "q"]}, "bands.1"),
        ({"split": {"fractions": {"train": 1.5}}}, "split.fractions.train"),
        ({"split": {"fractions": {"train": 0.5, "validation": 0.3, "test": 0.3}}}, "split.fractions"),
        ({"training": {"lr": 0}}, "training.lr"),
        ({"training": {"optimizer": "adagrad"}}, "training.optimizer"),
        ({"normalise": {"clip": [1, 0]}}, "normalise.clip"),
        ({"simulated": {"mag_r_range": [18, 14]}}, "simulated.mag_r_range"),
        ({"experiments": {"a": {"architecture": 3}}}, "experiments.a.architecture"),
        ({"experiments": {"a/../b": {"architecture": "x"}}}, "experiments"),
        ({"source": "images"}, "images.directory"),
        ({"cutout_size": 64.5}, "cutout_size"),
    ],
)
def test_bad_values_name_the_key(bad: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate_config(bad)


def test_unknown_keys_are_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'epoch'.*allowed keys: .*epochs"):
        validate_config({"training": {"epoch": 3}})
    with pytest.raises(ConfigError, match="unknown key"):
        validate_config({"shard": 3})


def test_experiment_overrides_merge_over_training_defaults(tmp_path: Path) -> None:
    (tmp_path / "tiny.yaml").write_text("description: tiny\narchitecture: [flatten]\n")
    cfg = validate_config({"training": {"epochs": 7, "lr": 0.01},
                           "experiments": {"a": {"architecture": "tiny", "training": {"lr": 0.5}}}})
    exps = resolve_experiments(cfg, [tmp_path])
    assert exps["a"]["training"]["lr"] == 0.5
    assert exps["a"]["training"]["epochs"] == 7  # not reset by the override's defaults
    assert exps["a"]["description"] == "tiny"
    assert exps["a"]["architecture"] == ["flatten"]


def test_missing_preset_lists_available(tmp_path: Path) -> None:
    (tmp_path / "one.yaml").write_text("architecture: [flatten]\n")
    cfg = validate_config({"experiments": {"a": {"architecture": "two"}}})
    with pytest.raises(ConfigError, match="available presets: one"):
        resolve_experiments(cfg, [tmp_path])


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_deep_merge_and_fingerprint_are_stable() -> None:
    a = {"x": {"y": 1, "z": 2}, "w": [1]}
    assert deep_merge(a, {"x": {"y": 5}}) == {"x": {"y": 5, "z": 2}, "w": [1]}
    assert a["x"]["y"] == 1
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "config").glob("*.yaml")))
def test_shipped_configs_validate_and_their_networks_build(name: str) -> None:
    """Every config in config/ is valid and each experiment's network fits its input shape."""
    from galpipe.stages.train import check_architectures

    cfg = load_config(REPO / "config" / name)
    experiments = resolve_experiments(cfg, [REPO / "config" / "architectures"])
    assert experiments
    check_architectures(cfg, experiments)  # raises ModelError naming the experiment and layer


@pytest.mark.parametrize("path", sorted((REPO / "config" / "architectures").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_has_a_one_line_description_and_builds(path: Path) -> None:
    from galpipe.config import load_preset
    from galpipe.nn.model import build_model
    from galpipe.stages.train import full_architecture

    preset = load_preset(path.stem, [path.parent])
    assert preset["description"].strip() and "\n" not in preset["description"].strip()
    if path.stem == "features_mlp":  # catalogue features, not pixels
        return
    model = build_model(full_architecture(preset["architecture"], 3), (32, 32, 3))
    assert model.n_params() > 0
