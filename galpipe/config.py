"""Load, validate and complete galpipe configurations.

The JSON schema is package data, ``galpipe/schemas/config.schema.yaml``
(``workflow/schemas/`` in a checkout links to it); the ``sdss:`` section has its
own fragment, ``sdss.schema.yaml``, merged in at load time.  The built-in
architecture presets are package data too (``galpipe/architectures/``, linked
from ``config/architectures/``).  Validation fills every default
and fails with :class:`~galpipe.errors.ConfigError` naming the offending key
before any job runs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from galpipe.errors import ConfigError
from galpipe.settings import Config


def _schema_text(name: str) -> str | None:
    # Package data (galpipe/schemas/NAME), the one copy: a checkout, an editable install and a
    # wheel all read the same file (workflow/schemas/NAME is a symlink to it).
    try:
        return (resources.files("galpipe") / "schemas" / name).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def _load_schema_yaml(text: str) -> Any:
    """Parse one of the package's own schema files with libyaml's safe loader where PyYAML was
    built with it (the same documents, ~10x faster: the pure-Python loader took ~0.5 s of every
    process that validates a config, i.e. every Snakemake call and every stage job)."""
    if yaml.__with_libyaml__:
        return yaml.load(text, Loader=yaml.CSafeLoader)
    return yaml.safe_load(text)  # pragma: no cover - PyYAML built without libyaml


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The configuration JSON schema (with the ``sdss`` fragment merged in).

    The schema is not checked against the JSON Schema metaschema here (that took ~0.3 s per
    process); ``tests/test_config.py::test_the_merged_schema_is_valid_json_schema`` does it.
    """
    text = _schema_text("config.schema.yaml")
    if text is None:  # pragma: no cover - broken installation
        raise ConfigError("config.schema.yaml not found in the galpipe installation")
    schema = _load_schema_yaml(text)
    sdss = _schema_text("sdss.schema.yaml")
    if sdss is not None:
        fragment = _load_schema_yaml(sdss)
        fragment.pop("$schema", None)
        fragment.setdefault("default", {})
        schema["properties"]["sdss"] = fragment
    else:  # pragma: no cover - the fragment ships with the package
        schema["properties"]["sdss"] = {"type": "object", "default": {}}
    return schema


def _key(path: Iterable[Any]) -> str:
    parts = [str(p) for p in path]
    return ".".join(parts) if parts else "<top level>"


def _format_error(err: jsonschema.ValidationError) -> str:
    key = _key(err.absolute_path)
    if err.validator == "additionalProperties":
        extra = sorted(
            set(err.instance) - set(err.schema.get("properties", {}))
            if isinstance(err.instance, Mapping)
            else []
        )
        allowed = sorted(err.schema.get("properties", {}))
        where = f"config key '{key}'" if err.absolute_path else "config"
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"{where}: unknown key(s) {', '.join(map(repr, extra))}{hint}"
    desc = err.schema.get("description") if isinstance(err.schema, Mapping) else None
    msg = f"config key '{key}': {err.message}"
    if desc:
        msg += f" (expected: {desc})"
    return msg


def _fill_defaults(instance: Any, schema: Mapping[str, Any], root: Mapping[str, Any]) -> Any:
    """Recursively insert schema defaults into ``instance`` (a deep copy is returned)."""
    if schema.get("x-galpipe-overrides"):
        return copy.deepcopy(instance)
    if "$ref" in schema:
        ref = schema["$ref"]
        target: Any = root
        for part in ref.lstrip("#/").split("/"):
            target = target[part]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return _fill_defaults(instance, merged, root)
    if isinstance(instance, dict) and schema.get("type") in ("object", None):
        out = dict(instance)
        for name, sub in schema.get("properties", {}).items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = _fill_defaults(out[name], sub, root)
        addl = schema.get("additionalProperties")
        if isinstance(addl, Mapping):
            for name in out:
                if name not in schema.get("properties", {}):
                    out[name] = _fill_defaults(out[name], addl, root)
        return out
    return instance


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``config`` against the schema and return it with every default filled.

    Raises
    ------
    ConfigError
        The first (deepest-path-first) problem, naming the key and what was expected.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"config: expected a mapping of keys, got {type(config).__name__}")
    _check_plain(config, [])
    schema = load_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(dict(config)),
                    key=lambda e: ([str(p) for p in e.absolute_path], e.message))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        raise ConfigError(_format_error(best))
    full = _fill_defaults(dict(config), schema, schema)
    errors = list(validator.iter_errors(full))
    if errors:  # a default inconsistent with a user value (should not happen)
        raise ConfigError(_format_error(jsonschema.exceptions.best_match(errors)))
    cross_field_checks(full)
    return full


def load_settings(config: Mapping[str, Any]) -> Config:
    """Validate ``config`` (filling every default) and build the typed, frozen :class:`~galpipe.settings.Config`."""
    return Config.from_dict(validate_config(config))


def as_section(name: str, value: Any) -> Any:
    """``value`` as the typed section ``name``: a section object is returned as is; a plain
    (partial) mapping, or None, goes through the schema (:func:`build_section`).

    For the library functions of the sources, which accept either.

    Raises
    ------
    ConfigError
        ``value`` is neither, or not a valid section (the message names the key).
    """
    cls = type(getattr(load_settings({}), name))
    if isinstance(value, cls):
        return value
    if value is not None and not isinstance(value, Mapping):
        raise ConfigError(f"config key '{name}': expected a mapping of settings, got {type(value).__name__}")
    return build_section(name, value)


def build_section(name: str, values: Mapping[str, Any] | None = None, **top_level: Any) -> Any:
    """Section ``name`` of a config that sets only ``values`` (and ``top_level`` keys), defaults filled.

    For library use and tests: ``build_section("simulated", {"n_galaxies": 50})``
    is exactly what the pipeline would pass, validated by the same schema.
    """
    return getattr(load_settings({name: dict(values or {}), **top_level}), name)


def _check_plain(value: Any, path: list[Any]) -> None:
    """Keys must be strings and numbers finite, everywhere (YAML allows ``1:`` keys and ``.nan``)."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            where = f"config key '{_key(path)}'" if path else "config"
            if not isinstance(k, str):
                raise ConfigError(f"{where}: key {k!r} ({type(k).__name__}) is not a string; quote it")
            if not k.isprintable():  # names become paths; schema patterns' '$' would let a final newline pass
                raise ConfigError(f"{where}: key {k!r} contains control characters")
            _check_plain(v, [*path, k])
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, [*path, i])
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{_key(path)}': {value!r} is not a finite number")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**63 - 1:
        raise ConfigError(
            f"config key '{_key(path)}': an integer of {value.bit_length()} bits is out of range "
            "(at most 64-bit integers)"
        )


def cross_field_checks(cfg: Mapping[str, Any]) -> None:
    """The checks that involve several keys at once (the schema checks each key alone).

    This is the one place for them: sources and stages receive validated
    :mod:`galpipe.settings` objects and do not re-check.
    """
    from galpipe.sources import source_names

    if cfg["source"] not in source_names():
        raise ConfigError(f"config key 'source': unknown source {cfg['source']!r}; "
                          f"available: {', '.join(source_names())}")
    fr = cfg["split"]["fractions"]
    total = fr["train"] + fr["validation"] + fr["test"]
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ConfigError(
            f"config key 'split.fractions': train + validation + test = {total:g}, expected 1"
        )
    weights = cfg["simulated"]["class_fractions"]
    if sum(weights.values()) <= 0:
        raise ConfigError("config key 'simulated.class_fractions': at least one weight must be > 0")
    lo, hi = cfg["simulated"]["mag_r_range"]
    if not lo < hi:
        raise ConfigError(f"config key 'simulated.mag_r_range': [{lo}, {hi}] must be increasing")
    reg = cfg["simulated"]["region"]
    for a, b in (("ra_min", "ra_max"), ("dec_min", "dec_max")):
        if not reg[a] < reg[b]:
            raise ConfigError(f"config key 'simulated.region': {a} must be < {b}")
    clo, chi = cfg["normalise"]["clip"]
    if not clo < chi:
        raise ConfigError(f"config key 'normalise.clip': [{clo}, {chi}] must be increasing")
    _sdss_checks(cfg["sdss"])
    source_check = _SOURCE_CHECKS.get(cfg["source"])
    if source_check is not None:
        source_check(cfg)


#: SDSS imaging bands (what the simulated survey renders and the SAS serves frames of).
_SDSS_BANDS = ("u", "g", "r", "i", "z")
#: Bands of the SkyServer colour JPEGs (``sdss.cutouts.provider: skyserver-jpeg``).
_JPEG_BANDS = ("red", "green", "blue")


def _sdss_checks(sdss: Mapping[str, Any]) -> None:
    """Cross-field checks of the ``sdss:`` section (run whatever the source, like the schema's)."""
    sel = sdss["selection"]
    for lo, hi in (("dec_min", "dec_max"), ("petro_mag_r_min", "petro_mag_r_max"),
                   ("petro_r90_r_min", "petro_r90_r_max")):
        if sel[lo] > sel[hi]:
            raise ConfigError(f"config key 'sdss.selection.{lo}': {sel[lo]} is larger than "
                              f"sdss.selection.{hi} ({sel[hi]})")
    labels = sdss["labels"]
    if labels["scheme"] == "gz1_fractions":
        _gz1_fraction_checks(labels["fractions"])
    if labels["classes"] is None:
        return
    if labels["scheme"] == "gz1_fractions":
        known: list[str] = list(labels["fractions"])
    else:
        from galpipe.sources.sdss import SCHEME_CLASSES

        known = list(SCHEME_CLASSES[labels["scheme"]])
    seen: set[str] = set()
    for cls in labels["classes"]:
        if cls not in known:
            raise ConfigError(f"config key 'sdss.labels.classes': {cls!r} is not a class of scheme "
                              f"{labels['scheme']!r}; expected some of {known}")
        if cls in seen:
            raise ConfigError(f"config key 'sdss.labels.classes': {cls!r} is listed twice")
        seen.add(cls)


def _gz1_fraction_checks(fractions: Mapping[str, Any] | None) -> None:
    """``sdss.labels.fractions`` (scheme ``gz1_fractions``): present, min <= max, a real cut per class."""
    if not fractions:
        raise ConfigError("config key 'sdss.labels.fractions': the gz1_fractions scheme needs at least one class "
                          "with {vote column: threshold}")
    for cls, conds in fractions.items():
        real_cut = False
        for col, spec in conds.items():
            lo, hi = (spec.get("min", 0.0), spec.get("max", 1.0)) if isinstance(spec, Mapping) else (spec, 1.0)
            if lo > hi:
                raise ConfigError(f"config key 'sdss.labels.fractions.{cls}.{col}': min {lo} is larger than max {hi}")
            real_cut = real_cut or lo > 0.0 or hi < 1.0
        if not real_cut:
            raise ConfigError(f"config key 'sdss.labels.fractions.{cls}': the thresholds select everything "
                              "(min 0 and max 1); give at least one real cut")


def _split_checks(class_counts: Mapping[str, int], fractions: Mapping[str, float], where: str,
                  what: str = "galaxies") -> None:
    """Refuse a single class, or a class that would leave a split without galaxies.

    ``class_counts`` is the number of galaxies (groups) of each class the source will give
    (a class listed with 0 is refused too: it was asked for and would be in no split);
    the split stage deals each class's galaxies out by :func:`galpipe.stages.split.allocate`.
    A shard may be empty; a split may not (train would have nothing to learn, or the
    model nothing to be chosen or scored on).
    """
    from galpipe.stages import SPLITS
    from galpipe.stages.split import allocate

    present = {str(c): int(n) for c, n in class_counts.items()}
    if len(present) < 2:
        only = f"only class {next(iter(present))!r}" if present else "no class"
        raise ConfigError(f"config key '{where}': {only} would have {what}; a classifier needs at least "
                          "two classes (add galaxies of another class)")
    fr = [float(fractions[s]) for s in SPLITS]
    for cls, n in present.items():
        for split, k in zip(SPLITS, allocate(n, fr), strict=True):
            if k == 0:
                raise ConfigError(
                    f"config key '{where}': class {cls!r} would have {n} {what}, none of them in the "
                    f"{split} split (split.fractions {dict(zip(SPLITS, fr, strict=True))}); every class needs "
                    f"at least {len(SPLITS)} so that no split lacks it"
                )


def _sdss_source_checks(cfg: Mapping[str, Any]) -> None:
    """``source: sdss``: the bands must be those of the cutout provider; two classes or more, each
    with enough objects (``selection.n_per_class``) for every split."""
    labels = cfg["sdss"]["labels"]
    if labels["classes"] is not None:
        classes = list(labels["classes"])
        key = "sdss.labels.classes"
    elif labels["scheme"] == "gz1_fractions":
        classes, key = list(labels["fractions"] or {}), "sdss.labels.fractions"
    else:
        from galpipe.sources.sdss import SCHEME_DEFAULT_CLASSES

        classes, key = list(SCHEME_DEFAULT_CLASSES[labels["scheme"]]), "sdss.labels.scheme"
    n = int(cfg["sdss"]["selection"]["n_per_class"])
    if len(classes) < 2:
        _split_checks(dict.fromkeys(classes, n), cfg["split"]["fractions"], key)
    _split_checks(dict.fromkeys(classes, n), cfg["split"]["fractions"], "sdss.selection.n_per_class",
                  what="objects")
    provider = cfg["sdss"]["cutouts"]["provider"]
    bands = list(cfg["bands"])
    if provider == "skyserver-jpeg" and bands != list(_JPEG_BANDS):
        raise ConfigError(f"config key 'bands': the skyserver-jpeg provider (sdss.cutouts.provider) writes bands "
                          f"{list(_JPEG_BANDS)}; set bands to that list (got {bands})")
    if provider == "sdss-frames" and not set(bands) <= set(_SDSS_BANDS):
        raise ConfigError(f"config key 'bands': the sdss-frames provider (sdss.cutouts.provider) needs SDSS bands "
                          f"from {list(_SDSS_BANDS)} (got {bands})")
    cutouts = cfg["sdss"]["cutouts"]
    if provider == "skyserver-jpeg" and cutouts["jpeg_scale_mode"] == "fixed":
        from galpipe.sources.sdss_cutouts import JPEG_SCALE_LIMITS, jpeg_cutout_scale_limits, jpeg_side

        size, scale = int(cfg["cutout_size"]), float(cutouts["jpeg_scale"])
        lo, hi = jpeg_cutout_scale_limits(size)
        if not lo <= scale <= hi:
            raise ConfigError(
                f"config key 'sdss.cutouts.jpeg_scale': {scale} arcsec/pixel at cutout_size {size} means asking "
                f"SkyServer ImgCutout for {jpeg_side(size)} pixels at {scale * size / jpeg_side(size):.6g} "
                f"arcsec/pixel, outside its limits {list(JPEG_SCALE_LIMITS)}; at this cutout_size use "
                f"{lo:.6g}..{hi:.6g}")


def _simulated_source_checks(cfg: Mapping[str, Any]) -> None:
    """``source: simulated``: the survey renders SDSS bands only; the class counts that
    ``n_galaxies`` and ``class_fractions`` give (as the catalogue draws them) fill every split."""
    bands = list(cfg["bands"])
    if not set(bands) <= set(_SDSS_BANDS):
        raise ConfigError(f"config key 'bands': the simulated source renders SDSS bands from {list(_SDSS_BANDS)} "
                          f"(got {bands})")
    from galpipe.sources.simulated import _class_counts, _normalised_fractions

    sim = cfg["simulated"]
    weighted = [c for c, w in sim["class_fractions"].items() if w > 0]
    if len(weighted) < 2:
        raise ConfigError(f"config key 'simulated.class_fractions': only {weighted} has a weight > 0; a classifier "
                          "needs at least two classes")
    counts = _class_counts(int(sim["n_galaxies"]), _normalised_fractions(sim["class_fractions"]))
    _split_checks({c: counts[c] for c in weighted}, cfg["split"]["fractions"], "simulated.n_galaxies")


def _images_source_checks(cfg: Mapping[str, Any]) -> None:
    """``source: images``: the folder and the labels CSV must be given; when both exist, the
    labels (read as the catalogue stage reads them) must give two classes or more, each filling
    every split, and no two rows may share an image file or its content.

    A labels CSV or folder that does not exist yet is left to the catalogue stage (Snakemake
    reports the missing input).
    """
    for key in ("directory", "labels_csv"):
        if not cfg["images"][key]:
            raise ConfigError(f"config key 'images.{key}': required when source is 'images'")
    csv, directory = Path(cfg["images"]["labels_csv"]), Path(cfg["images"]["directory"])
    if not (csv.is_file() and directory.is_dir()):
        return
    _images_data_checks(json.dumps(cfg["images"], sort_keys=True), _file_stamp(csv), _file_stamp(directory),
                        json.dumps(cfg["split"]["fractions"], sort_keys=True))


def _file_stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


@lru_cache(maxsize=8)
def _images_data_checks(images_json: str, _csv_stamp: tuple[int, int], _dir_stamp: tuple[int, int],
                        fractions_json: str) -> None:
    """The data checks of :func:`_images_source_checks`, once per process for unchanged inputs."""
    from galpipe.settings import ImagesConfig
    from galpipe.sources.images import check_duplicate_content, read_labels

    images = ImagesConfig.from_dict(json.loads(images_json), "images")
    labels = read_labels(images)  # DataError naming the CSV, the row and the key
    counts = labels["label"].value_counts().to_dict()
    _split_checks(counts, json.loads(fractions_json), "images.labels_csv",
                  what=f"labelled rows in {images.labels_csv}")
    check_duplicate_content(labels, str(images.labels_csv))


#: Checks that apply only when a given source is configured.
_SOURCE_CHECKS: dict[str, Callable[[Mapping[str, Any]], None]] = {
    "simulated": _simulated_source_checks,
    "images": _images_source_checks,
    "sdss": _sdss_source_checks,
}


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML config file, apply ``overrides`` (deep-merged) and validate it."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {p} not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    if overrides:
        raw = deep_merge(raw, overrides)
    return validate_config(raw)


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``over`` into a copy of ``base`` (mappings merge, others replace)."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def fingerprint(*parts: Any, length: int = 12) -> str:
    """Stable short hash of JSON-serialisable ``parts`` (used to key caches)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


# --------------------------------------------------------------------------- experiments
def builtin_presets() -> Traversable:
    """The architecture presets shipped with galpipe (package data ``galpipe/architectures``).

    Found through :mod:`importlib.resources`, so in a checkout, an editable install and an
    installed wheel alike; a checkout's ``config/architectures`` is a symlink to this folder.
    """
    return resources.files("galpipe") / "architectures"


def preset_search_path(config_path: str | Path | None = None) -> list[Path | Traversable]:
    """Where architecture presets are looked up, first match wins.

    The ``architectures/`` folder next to the config file ``config_path`` (when given), then
    the built-in presets (:func:`builtin_presets`).
    """
    dirs: list[Path | Traversable] = []
    if config_path is not None:
        dirs.append(Path(config_path).resolve().parent / "architectures")
    dirs.append(builtin_presets())
    return dirs


def preset_file(name: str, preset_dirs: Iterable[str | Path | Traversable]) -> Path | None:
    """The file of architecture preset ``name`` (the first dir that has it), or None.

    The train rule lists it as an input of the experiments that use it, so
    editing a preset reruns exactly those experiments.
    """
    for d in preset_dirs:
        f = (Path(d) if isinstance(d, str) else d).joinpath(f"{name}.yaml")
        if f.is_file():
            return Path(str(f))
    return None


def load_preset(name: str, preset_dirs: Iterable[str | Path | Traversable]) -> dict[str, Any]:
    """Read architecture preset ``name`` (``NAME.yaml``) from the first dir that has it.

    ``preset_dirs`` are paths or :mod:`importlib.resources` traversables (such as
    :func:`builtin_presets`); see :func:`preset_search_path`.

    Returns
    -------
    dict
        ``{"description": str, "architecture": list}``.
    """
    dirs = [Path(d) if isinstance(d, str) else d for d in preset_dirs]
    for d in dirs:
        f = d.joinpath(f"{name}.yaml")
        if f.is_file():
            data = yaml.safe_load(f.read_text(encoding="utf-8"))
            if not isinstance(data, Mapping) or not isinstance(data.get("architecture"), list):
                raise ConfigError(f"architecture preset {f}: expected a mapping with an 'architecture' list")
            return {"description": str(data.get("description", "")), "architecture": data["architecture"]}
    available = sorted(
        {f.name.removesuffix(".yaml") for d in dirs if d.is_dir() for f in d.iterdir() if f.name.endswith(".yaml")}
    )
    raise ConfigError(
        f"architecture preset {name!r} not found in {[str(d) for d in dirs]}; "
        f"available presets: {', '.join(available) or 'none'}"
    )


def resolve_experiments(
    cfg: Mapping[str, Any], preset_dirs: Iterable[str | Path | Traversable]
) -> dict[str, dict[str, Any]]:
    """Per experiment: architecture list, description, inputs and merged training settings."""
    out: dict[str, dict[str, Any]] = {}
    dirs = list(preset_dirs)
    for name, exp in cfg["experiments"].items():
        arch = exp["architecture"]
        description = exp.get("description", "")
        preset = None
        if isinstance(arch, str):
            preset = arch
            loaded = load_preset(arch, dirs)
            arch = loaded["architecture"]
            description = description or loaded["description"]
        training = deep_merge(cfg["training"], exp.get("training", {}))
        out[name] = {
            "architecture": arch,
            "preset": preset,
            "description": description,
            "inputs": exp.get("inputs", "image"),
            "training": training,
            **({"seed": int(exp["seed"])} if exp.get("seed") is not None else {}),
        }
    return out
