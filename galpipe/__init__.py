"""galpipe: a reproducible galaxy-identification pipeline.

Catalogue (simulated survey, image folder or live SDSS) -> FITS cutouts ->
normalised arrays -> Parquet splits -> a from-scratch NumPy CNN -> evaluation.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("galpipe")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
