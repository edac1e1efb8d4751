"""The schema is the only place defaults and ranges live (issue: one source of truth).

* every config-section dataclass in :mod:`galpipe.settings` has exactly the schema's keys
  and no defaults of its own;
* a minimal config builds, and every value the code receives is the schema's default;
* no module keeps a defaults table, and no function parameter named like a config key
  has a default that differs from the schema's.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import pkgutil
from pathlib import Path
from typing import Any

import pytest

import galpipe
from galpipe.config import build_section, load_schema, load_settings, validate_config
from galpipe.errors import ConfigError
from galpipe.settings import Config, Section, _section_type

PACKAGE = Path(galpipe.__file__).parent


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target: Any = schema
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _pairs(cls: type[Section], node: dict[str, Any], schema: dict[str, Any], where: str):
    """(dataclass, schema node, key path) for every section class, recursively."""
    yield cls, node, where
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for name in hints:
        sub = _section_type(inspect.get_annotations(cls, eval_str=True)[name])
        if sub is not None:
            yield from _pairs(sub, _resolve(schema, node["properties"][name]), schema, f"{where}.{name}")


def test_sections_have_exactly_the_schema_keys_and_no_defaults():
    schema = load_schema()
    seen = 0
    for cls, node, where in _pairs(Config, schema, schema, "config"):
        fields = dataclasses.fields(cls)
        assert [f.name for f in fields if f.default is not dataclasses.MISSING
                or f.default_factory is not dataclasses.MISSING] == [], f"{where}: a default outside the schema"
        assert {f.name for f in fields} == set(node["properties"]), where
        seen += 1
    assert seen == 14  # Config, simulated(+region), images, sdss(+5), normalise, split(+fractions), evaluate


def test_minimal_config_gets_every_schema_default():
    cfg = load_settings({})
    schema = load_schema()

    def check(value: Any, node: dict[str, Any], where: str) -> None:
        node = _resolve(schema, node)
        if "default" in node and node.get("type") != "object":
            assert galpipe.settings.thaw(value) == node["default"], where
        for name, sub in node.get("properties", {}).items():
            if isinstance(value, Section):
                check(getattr(value, name), sub, f"{where}.{name}")
            elif isinstance(value, dict | type(cfg.training)) and name in value:
                check(value[name], sub, f"{where}.{name}")

    check(cfg, schema, "config")
    assert cfg.training["schedule"]["warmup_epochs"] == 1  # the object default agrees with its property
    assert cfg.to_dict() == validate_config({})


def test_schedule_with_only_a_type_keeps_the_schema_warmup():
    cfg = validate_config({"training": {"schedule": {"type": "cosine"}}})
    assert cfg["training"]["schedule"]["warmup_epochs"] == 1


def test_sections_are_frozen_and_round_trip():
    sim = build_section("simulated", {"n_galaxies": 50, "mag_r_range": [15, 17]})
    assert sim.n_galaxies == 50 and sim.mag_r_range == (15, 17)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sim.n_galaxies = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        sim.class_fractions["spiral"] = 2.0  # type: ignore[index]
    assert type(sim).from_dict(sim.to_dict(), "simulated") == sim
    with pytest.raises(ConfigError, match="missing key"):
        type(sim).from_dict({"n_galaxies": 5}, "simulated")


def _modules() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "testing" not in p.parts]


def test_no_module_level_defaults_table():
    offenders = []
    for p in _modules():
        for node in ast.parse(p.read_text(encoding="utf-8")).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            for t in targets:
                if isinstance(t, ast.Name) and t.id.upper().endswith("DEFAULTS"):
                    offenders.append(f"{p.relative_to(PACKAGE)}:{node.lineno} {t.id}")
    assert offenders == []


def _schema_leaf_defaults() -> dict[str, set[str]]:
    """Config leaf key name -> the JSON of every default the schema gives keys of that name."""
    import json

    schema = load_schema()
    out: dict[str, set[str]] = {}

    def walk(node: dict[str, Any]) -> None:
        node = _resolve(schema, node)
        for name, sub in node.get("properties", {}).items():
            sub = _resolve(schema, sub)
            if "default" in sub and sub.get("type") != "object":
                out.setdefault(name, set()).add(json.dumps(sub["default"]))
            walk(sub)
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"])

    walk(schema)
    return out


#: Parameters named like a config key that deliberately mean something else, with the reason.
NOT_THE_CONFIG_KEY = {
    ("galpipe.predict", "seed"): "seed of prediction-time randomness (MC dropout), not the pipeline seed",
    ("galpipe.predict", "tta"): "predict's --tta option (off unless asked), not evaluate.tta",
}
#: The modules that receive configuration: the pipeline side of galpipe.  galpipe.nn is a
#: general library with an API of its own (an optimizer's default momentum is not a config
#: value); its one config object, TrainConfig, is checked explicitly.
PIPELINE_PREFIXES = ("galpipe.stages", "galpipe.sources", "galpipe.config", "galpipe.settings",
                     "galpipe.predict", "galpipe.cli", "galpipe.features",
                     "galpipe.catalogue", "galpipe.smk")


def test_no_function_default_disagrees_with_the_schema():
    import importlib
    import json

    leaves = _schema_leaf_defaults()
    offenders = []
    for info in pkgutil.walk_packages(galpipe.__path__, "galpipe."):
        if not info.name.startswith(PIPELINE_PREFIXES) and info.name != "galpipe.nn.training":
            continue
        mod = importlib.import_module(info.name)
        objects = [mod.TrainConfig] if info.name == "galpipe.nn.training" else vars(mod).values()
        for obj in objects:
            funcs = [obj] if inspect.isfunction(obj) else [
                f for f in vars(obj).values() if inspect.isfunction(f)] if inspect.isclass(obj) else []
            for f in funcs:
                if getattr(f, "__module__", None) != info.name:
                    continue
                for p in inspect.signature(f).parameters.values():
                    if p.name not in leaves or p.default in (inspect.Parameter.empty, None):
                        continue  # None: "not given", the caller's config decides
                    if (info.name, p.name) in NOT_THE_CONFIG_KEY:
                        continue
                    value = list(p.default) if isinstance(p.default, tuple) else p.default
                    if json.dumps(value, default=repr) not in leaves[p.name]:
                        offenders.append(f"{info.name}.{f.__qualname__}({p.name}={p.default!r}); "
                                         f"schema: {sorted(leaves[p.name])}")
    assert offenders == []
