"""File formats and file safety, one module each.

* :mod:`galpipe.io.atomic` - atomic writes (temp file + rename), stale-temp sweeping, safe file names;
* :mod:`galpipe.io.parquet` - Parquet tables with JSON metadata under ``galpipe.*`` keys;
* :mod:`galpipe.io.cutout_fits` - the per-galaxy multi-band cutout FITS layout every source writes.
"""
