"""Typed, frozen views of a validated configuration: one dataclass per config section.

The JSON schema (``workflow/schemas/*.schema.yaml``) is the only place where
defaults and ranges live.  :func:`galpipe.config.validate_config` checks a
config against it and fills every default; :meth:`Config.from_dict` then builds
these objects once.  The dataclasses declare field names and types only — no
defaults — so a key the schema does not fill is an error here, not a silently
different value (``tests/test_settings.py`` checks that every section's fields
are exactly the schema's keys).  Modules receive these objects and never
re-check what the schema already checked; the few checks that involve several
keys at once live in :mod:`galpipe.config` (``cross_field_checks``).

Lists become tuples and mappings become read-only mappings, so a section can be
passed around without being changed behind anyone's back; :meth:`Section.to_dict`
gives back plain JSON-able data (what Snakemake compares as a rule's params).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

from galpipe.errors import ConfigError

S = TypeVar("S", bound="Section")


def freeze(value: Any) -> Any:
    """Read-only copy of plain data: lists -> tuples, dicts -> ``MappingProxyType``."""
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Plain JSON-able data from a section, a frozen mapping or a tuple."""
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [thaw(v) for v in value]
    return value


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section_type(hint: Any) -> type[Section] | None:
    """The Section subclass a field holds (also inside ``X | None``), else None."""
    if isinstance(hint, type) and issubclass(hint, Section):
        return hint
    for arg in typing.get_args(hint):
        if isinstance(arg, type) and issubclass(arg, Section):
            return arg
    return None


class Section:
    """Base of the config-section dataclasses: build from validated data, give it back."""

    @classmethod
    def from_dict(cls: type[S], data: Mapping[str, Any], where: str = "") -> S:
        """Build the section from a *validated* mapping (every key present, defaults filled).

        Raises
        ------
        ConfigError
            A key is missing or unknown: the mapping was not validated against
            the schema (or the schema and this class disagree).
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"config key '{where or cls.__name__}': expected a mapping, got {data!r}")
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        missing = [n for n in names if n not in data]
        extra = sorted(set(data) - set(names))
        if missing or extra:
            raise ConfigError(
                f"config section '{where or cls.__name__}': missing key(s) {missing}, unknown key(s) {extra}; "
                "build sections from galpipe.config.validate_config output"
            )
        values: dict[str, Any] = {}
        for name in names:
            sub = _section_type(_hints(cls)[name])
            key = f"{where}.{name}" if where else name
            values[name] = (sub.from_dict(data[name], key) if sub is not None and data[name] is not None
                            else freeze(data[name]))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain (JSON-able) data: the inverse of :meth:`from_dict`."""
        return {f.name: thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


# --------------------------------------------------------------------------- simulated
@dataclass(frozen=True)
class Region(Section):
    """A sky box in degrees."""

    ra_min: float
    ra_max: float
    dec_min: float
    dec_max: float


@dataclass(frozen=True)
class SimulatedConfig(Section):
    """``simulated:`` — the GalSim survey."""

    n_galaxies: int
    class_fractions: Mapping[str, float]
    pixel_scale: float
    psf_fwhm: float
    mag_r_range: tuple[float, float]
    region: Region


# --------------------------------------------------------------------------- images
@dataclass(frozen=True)
class ImagesConfig(Section):
    """``images:`` — a folder of labelled images."""

    directory: str | None
    labels_csv: str | None
    id_column: str
    label_column: str
    path_column: str
    label_map: Mapping[str, str | None]
    crop_fraction: float
    span_r90: float | None


# --------------------------------------------------------------------------- sdss
@dataclass(frozen=True)
class SdssLabels(Section):
    """``sdss.labels:`` — which Galaxy Zoo (or spectroscopic) labels become classes."""

    scheme: str
    classes: tuple[str, ...] | None
    fractions: Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class SdssSelection(Section):
    """``sdss.selection:`` — sky box, magnitude and size ranges, galaxies per class."""

    ra_min: float
    ra_max: float
    dec_min: float
    dec_max: float
    petro_mag_r_min: float
    petro_mag_r_max: float
    petro_r90_r_min: float
    petro_r90_r_max: float
    n_per_class: int


@dataclass(frozen=True)
class SdssQuery(Section):
    """``sdss.query:`` — SkyServer paging, query rate, timeout and retries."""

    page_size: int
    max_queries_per_minute: float
    timeout_s: float
    max_retries: int
    backoff_base_s: float
    backoff_max_s: float
    max_junk_retries: int
    rate_limit_wait_s: float


@dataclass(frozen=True)
class SdssCutouts(Section):
    """``sdss.cutouts:`` — image provider, frame cache bound, JPEG scale."""

    provider: str
    cache_max_mb: float | None
    frame_shape: tuple[int, int] | None
    max_fill_fraction: float
    jpeg_scale_mode: str
    jpeg_scale: float
    jpeg_span_r90: float


@dataclass(frozen=True)
class SdssDownload(Section):
    """``sdss.download:`` — concurrency, shared request rate, timeouts and retries."""

    concurrency: int
    requests_per_second: float
    burst: int
    timeout_s: float
    max_retries: int
    backoff_base_s: float
    backoff_max_s: float
    retry_after_max_s: float


@dataclass(frozen=True)
class SdssConfig(Section):
    """``sdss:`` — the live SDSS services."""

    data_release: int
    skyserver_url: str
    sas_url: str
    labels: SdssLabels
    selection: SdssSelection
    query: SdssQuery
    cutouts: SdssCutouts
    download: SdssDownload


# --------------------------------------------------------------------------- normalise / split / evaluate
@dataclass(frozen=True)
class NormaliseConfig(Section):
    """``normalise:`` — per-band scaling to network-ready float32."""

    softening: float
    reference_flux: float
    clip: tuple[float, float]
    bad_pixel_value: float


@dataclass(frozen=True)
class SplitFractions(Section):
    """``split.fractions:`` — fractions of galaxies per split (sum to 1)."""

    train: float
    validation: float
    test: float


@dataclass(frozen=True)
class SplitConfig(Section):
    """``split:`` — stratified, grouped, deterministic split."""

    fractions: SplitFractions
    row_group_size: int


@dataclass(frozen=True)
class EvaluateConfig(Section):
    """``evaluate:`` — test-set evaluation of every experiment."""

    tta: bool
    mc_dropout: int
    n_bootstrap: int
    gallery_size: int


# --------------------------------------------------------------------------- whole config
@dataclass(frozen=True)
class Config(Section):
    """A whole validated configuration.

    ``training`` (the defaults of every experiment) and ``experiments`` stay
    plain mappings here: an experiment overrides some training keys, so the
    per-experiment :class:`galpipe.nn.training.TrainConfig` is built by
    :func:`galpipe.config.resolve_experiments`.  ``limits`` (``max_parameters``,
    ``max_activation_mb``, ``max_layers``: the caps :func:`galpipe.stages.train.check_architectures`
    applies to every experiment) is a read-only mapping too.
    """

    source: str
    seed: int
    bands: tuple[str, ...]
    cutout_size: int
    shards: int
    max_reject_fraction: float
    simulated: SimulatedConfig
    images: ImagesConfig
    sdss: SdssConfig
    normalise: NormaliseConfig
    split: SplitConfig
    training: Mapping[str, Any]
    experiments: Mapping[str, Mapping[str, Any]]
    evaluate: EvaluateConfig
    limits: Mapping[str, Any]

    def section(self, name: str) -> Any:
        """The section called ``name`` (e.g. the configured source's own section)."""
        return getattr(self, name)
