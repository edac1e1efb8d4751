"""Sources of galaxies: one module per source, one registry (this module).

Built in: ``simulated`` (GalSim survey, offline), ``images`` (a folder of
labelled images), ``sdss`` (the live SDSS services).  Each is a class
implementing :class:`galpipe.sources.base.Source`; the rest of galpipe finds it
here by the config key ``source`` and never tests the name itself.

A new source is one module with a class decorated by :func:`register_source`
(see ``docs/architecture.md``, "Add a source").
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from galpipe.errors import ConfigError

if TYPE_CHECKING:
    from galpipe.settings import Config
    from galpipe.sources.base import Source

#: Built-in sources and the module defining each (imported on first use, so the
#: simulated source never imports astroquery and the sdss source never imports GalSim).
BUILTIN_SOURCES: dict[str, str] = {
    "simulated": "galpipe.sources.simulated",
    "images": "galpipe.sources.images",
    "sdss": "galpipe.sources.sdss",
}

_REGISTRY: dict[str, type[Source]] = {}


def register_source(cls: type[Source]) -> type[Source]:
    """Class decorator: make ``cls`` available as ``source: <cls.name>``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"source class {cls.__name__} needs a class attribute 'name'")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"source {name!r} is already registered by {_REGISTRY[name].__module__}")
    _REGISTRY[name] = cls
    return cls


def source_names() -> list[str]:
    """Every source that can be configured (built-in and registered)."""
    return sorted(set(BUILTIN_SOURCES) | set(_REGISTRY))


def source_class(name: str) -> type[Source]:
    """The class of source ``name``.

    Raises
    ------
    ConfigError
        An unknown name, listing the available sources.
    """
    if name not in _REGISTRY and name in BUILTIN_SOURCES:
        importlib.import_module(BUILTIN_SOURCES[name])
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"config key 'source': unknown source {name!r}; available: {', '.join(source_names())}"
        ) from None


def get_source(cfg: Config) -> Source:
    """The configured source, ready to use."""
    return source_class(cfg.source)(cfg)
