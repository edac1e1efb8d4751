"""The ``Source`` interface: where a catalogue and its pixels come from.

A source is one class in one module (``galpipe/sources/<name>.py``), registered
with :func:`galpipe.sources.register_source`.  The pipeline talks to a source only
through this interface, so adding a source never touches the stages, the CLI or
the Snakefile:

==========================  ==========================================================
``name``                    the value of the config key ``source``
``bands``                   channel names of its cutouts (``("g", "r", "i")``, ...)
``params()``                the config it depends on (a rule's params; a cache key)
``catalogue()``             the catalogue table (``objid``, ``ra``, ``dec``, ``label``,
                            ...) and its provenance
``make_cutouts(shard, c)``  one cutout FITS per galaxy of a shard, through the shared
                            :class:`CutoutCache` ``c``; returns the manifest
``catalogue_columns``       the catalogue columns ``make_cutouts`` reads
``input_files()``           the local files the catalogue reads (a labels CSV)
``shard_input_files(n)``    per shard, the local files its cutouts are made from (images):
                            the pipeline hashes them, so a changed file reruns its shard
``load_external(path, ..)`` one external image -> cutout pixels, exactly as
                            ``make_cutouts`` would make them (``galpipe predict``)
``crop_fraction``           the centre crop ``load_external`` applies to an image made
                            like this source's inputs (1.0: none); stored with a model
==========================  ==========================================================

One optional attribute, read through :func:`shard_group_columns`:

==========================  ==========================================================
``shard_group_columns``     catalogue columns whose values tie galaxies to one shard
                            (``sdss`` with ``sdss-frames``: the field ``run, rerun,
                            camcol, field``, so each frame is fetched by one job only);
                            absent or empty: galaxies are dealt one by one
==========================  ==========================================================

Every source writes cutouts in the one layout of :mod:`galpipe.io.cutout_fits`
through :class:`CutoutCache`, which writes atomically and validates a cached
file before it is reused.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import pandas as pd
from astropy.utils.exceptions import AstropyWarning

from galpipe.errors import DataError
from galpipe.io.cutout_fits import Cutout, cutout_filename, read_cutout, write_cutout
from galpipe.settings import Config

PathLike = str | os.PathLike[str]

#: Columns of a cutouts manifest, one row per galaxy of the shard.
MANIFEST_COLUMNS = ("objid", "path", "status", "reason", "n_filled")


@dataclass(frozen=True)
class ExternalImage:
    """One external image turned into cutout pixels (what ``make_cutouts`` would write).

    Attributes
    ----------
    data : numpy.ndarray
        ``(n_bands, size, size)``; uint8 for 8-bit images (``bunit="DN"``),
        float32 for fluxes.
    bunit : str
        ``"DN"`` or a flux unit (``"nanomaggy"``).
    bands : tuple of str
        Band (channel) names, ``n_bands`` of them.
    """

    data: np.ndarray
    bunit: str
    bands: tuple[str, ...]


@runtime_checkable
class Source(Protocol):
    """What the pipeline needs from a source of galaxies (see the module docstring)."""

    name: ClassVar[str]

    def __init__(self, cfg: Config) -> None: ...

    @property
    def catalogue_columns(self) -> tuple[str, ...]:
        """Catalogue columns ``make_cutouts`` reads from each row (``galpipe predict`` checks a
        user's catalogue against them before fetching anything)."""
        ...

    @property
    def bands(self) -> tuple[str, ...] | None:
        """Channel names of the cutouts; None when the files decide (a folder of images)."""
        ...

    @property
    def crop_fraction(self) -> float:
        """Centre crop that turns an input image into a cutout (1.0 for sources that cut stamps themselves)."""
        ...

    def params(self) -> dict[str, Any]:
        """The configuration the catalogue and the cutouts depend on (plain JSON-able data)."""
        ...

    def catalogue(self) -> tuple[pd.DataFrame, dict[str, Any]]:
        """The catalogue (``objid``, ``ra``, ``dec``, ``label`` and more) and its provenance."""
        ...

    def make_cutouts(self, shard: pd.DataFrame, cache: CutoutCache, *, progress: bool = False) -> pd.DataFrame:
        """Make the cutout of every galaxy of ``shard`` in ``cache``; return the manifest.

        The manifest has :data:`MANIFEST_COLUMNS`, one row per galaxy in shard
        order; a galaxy that failed has ``status="failed"`` and the reason.
        """
        ...

    def input_files(self) -> list[Path]:
        """The local files :meth:`catalogue` reads (empty for none)."""
        ...

    def shard_input_files(self, n_shards: int) -> list[list[Path]]:
        """Per shard (as the catalogue stage deals them), the local files :meth:`make_cutouts` reads."""
        ...

    @classmethod
    def load_external(cls, path: PathLike, *, size: int, crop_fraction: float) -> ExternalImage:
        """One external image file as cutout pixels, made as :meth:`make_cutouts` makes them."""
        ...


def shard_group_columns(source: object) -> tuple[str, ...]:
    """The source's optional ``shard_group_columns`` (empty when it has none).

    The catalogue stage deals shards with
    :func:`galpipe.catalogue.shard_catalogue` grouped by these columns, and a
    source's ``shard_input_files`` must deal the same way (it calls the same
    function with the same columns).
    """
    return tuple(str(c) for c in (getattr(source, "shard_group_columns", ()) or ()))


class NoLocalFiles:
    """Mixin for a source that reads no local files (its pixels come from the config or the network).

    Gives the :class:`Source` methods about local files: none for the catalogue, none per shard,
    and external images loaded like a folder of images (:func:`galpipe.sources.images.load_external_image`).
    """

    def input_files(self) -> list[Path]:
        """None: nothing local is read."""
        return []

    def shard_input_files(self, n_shards: int) -> list[list[Path]]:
        """No local files for any shard."""
        return [[] for _ in range(n_shards)]

    @classmethod
    def load_external(cls, path: PathLike, *, size: int, crop_fraction: float) -> ExternalImage:
        """An external FITS, JPEG or PNG image as cutout pixels (see :func:`.images.load_external_image`)."""
        from galpipe.sources.images import load_external_image

        return load_external_image(path, size=size, crop_fraction=crop_fraction)


class CutoutCache:
    """The per-galaxy cutout files of one source configuration: ``root/<objid>.fits``.

    The only writer and validator of cached cutouts, shared by every source.
    Writes are atomic (:func:`galpipe.io.atomic.atomic_path`: a temporary file
    named after the writing process, then a rename), so parallel shard jobs can
    share a folder: a killed writer's temporary file is swept by the next
    writer, and a live writer's never is.

    Parameters
    ----------
    root : path-like
        Folder of the cutouts (created when the first one is written).
    """

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root)

    def path(self, objid: int) -> Path:
        """Where the cutout of ``objid`` lives."""
        return self.root / cutout_filename(objid)

    def load_valid(self, objid: int, *, size: int, bands: Iterable[str] | None = None) -> Cutout | None:
        """The cached cutout of ``objid`` if it exists and is valid, else None.

        Valid means: it reads back in the galpipe layout, holds ``objid``, has
        ``bands`` (when given, in that order) and is ``size`` x ``size``.
        A corrupt, truncated or stale file counts as absent (it is rewritten).
        """
        path = self.path(objid)
        if not path.is_file():
            return None
        want = list(bands) if bands is not None else None
        try:
            with warnings.catch_warnings():  # astropy warns about the corrupt files we replace
                warnings.simplefilter("ignore", AstropyWarning)
                cut = read_cutout(path, bands=want)
        except DataError:
            return None
        if cut.objid != int(objid) or cut.data.shape[1:] != (size, size):
            return None
        if want is not None and list(cut.bands) != want:
            return None
        return cut

    def write(self, objid: int, data: np.ndarray, **layout: Any) -> Path:
        """Write the cutout of ``objid`` atomically (``layout``: see :func:`galpipe.io.cutout_fits.write_cutout`)."""
        path = self.path(objid)
        write_cutout(path, data, objid=int(objid), **layout)
        return path


def manifest_frame(rows: Iterable[tuple[int, str, str, str, int]]) -> pd.DataFrame:
    """A cutouts manifest from ``(objid, path, status, reason, n_filled)`` rows."""
    rows = list(rows)
    return pd.DataFrame(
        {
            "objid": np.array([r[0] for r in rows], dtype=np.int64),
            "path": pd.Series([str(r[1]) for r in rows], dtype=object),
            "status": pd.Series([r[2] for r in rows], dtype=object),
            "reason": pd.Series([r[3] for r in rows], dtype=object),
            "n_filled": np.array([r[4] for r in rows], dtype=np.int64),
        }
    )
