"""Mini-batch datasets: streamed Parquet splits and in-memory arrays.

The split Parquet format (written by the pipeline's split stage) has the
columns ``objid`` (int64), ``label`` (string), ``label_index`` (int32, index
into the class list), ``image`` (``fixed_size_list<float32>[H*W*C]``: the
channels-last ``(H, W, C)`` image flattened in C order) plus arbitrary
catalogue columns.  The schema metadata holds JSON values under the keys
``galpipe.image_shape`` (``[H, W, C]``), ``galpipe.classes`` (class names,
position = ``label_index``) and ``galpipe.bands``.

:class:`ParquetImageDataset` never loads a whole file: it reads one row group
at a time into a bounded shuffle buffer.  :class:`ArrayDataset` offers the same
interface over arrays already in memory (small data sets, catalogue-feature
baselines, tests).

Every random stream of the training code is derived from ``(seed, epoch,
stream)`` with :func:`epoch_rng`, so any epoch can be replayed exactly (this is
what makes resuming from a checkpoint bit-identical).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from galpipe.errors import ConfigError, DataError

#: Stream ids for :func:`epoch_rng` (documented so that every consumer agrees).
STREAM_SHUFFLE = 1
STREAM_AUGMENT = 2
STREAM_DROPOUT = 3
STREAM_MC_DROPOUT = 4

#: Column names understood by ``iter_batches``.
IMAGE, LABEL, OBJID = "image", "label_index", "objid"

_META_SHAPE = b"galpipe.image_shape"
_META_CLASSES = b"galpipe.classes"
_META_BANDS = b"galpipe.bands"


def epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    """The random generator of one ``stream`` in one ``epoch`` of a run seeded ``seed``.

    ``np.random.default_rng([seed, epoch, stream])``: independent streams that
    depend only on the three integers, never on what ran before.
    """
    return np.random.default_rng([int(seed), int(epoch), int(stream)])


def _check_batch_args(batch_size: int, buffer_size: int, columns: Sequence[str]) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")
    if isinstance(buffer_size, bool) or not isinstance(buffer_size, int | np.integer):
        raise ConfigError(f"buffer_size must be a positive integer, got {buffer_size!r}")
    if buffer_size < 1:
        raise ConfigError(f"buffer_size must be a positive integer, got {buffer_size}")
    if isinstance(columns, str) or len(columns) == 0:
        raise ConfigError(f"columns must be a non-empty sequence of column names, got {columns!r}")


class ParquetImageDataset:
    """A split Parquet file read in mini-batches, one row group at a time.

    Parameters
    ----------
    path : path-like
        ``train.parquet`` / ``validation.parquet`` / ``test.parquet`` in the
        split format described in the module docstring.

    Attributes
    ----------
    path : pathlib.Path
    n_rows : int
        Number of rows (galaxies).
    image_shape : tuple of int
        ``(H, W, C)`` of one image.
    classes : list of str
        Class names; ``label_index`` indexes this list.
    bands : list of str
        Band names (the ``C`` channels, in order).
    peak_buffer_rows : int
        Largest number of rows held in the shuffle buffer by the last shuffled
        :meth:`iter_batches` (at most ``max(buffer_size, batch_size)`` plus one
        row group).

    Raises
    ------
    DataError
        The file is missing, not Parquet, or lacks the galpipe metadata or the
        ``image`` / ``label_index`` columns, or the image column has the wrong
        type or size.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"dataset {self.path}: file not found")
        try:
            self._pf = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"dataset {self.path}: not a readable Parquet file ({exc})") from exc
        schema = self._pf.schema_arrow
        meta = schema.metadata or {}
        shape = self._meta_json(meta, _META_SHAPE)
        if (
            not isinstance(shape, list)
            or len(shape) != 3
            or not all(isinstance(d, int) and d > 0 for d in shape)
        ):
            raise DataError(
                f"dataset {self.path}: metadata galpipe.image_shape must be [H, W, C] "
                f"positive integers, got {shape!r}"
            )
        self.image_shape: tuple[int, int, int] = (shape[0], shape[1], shape[2])
        classes = self._meta_json(meta, _META_CLASSES)
        if not isinstance(classes, list) or not classes or not all(
            isinstance(c, str) for c in classes
        ):
            raise DataError(
                f"dataset {self.path}: metadata galpipe.classes must be a non-empty list of "
                f"strings, got {classes!r}"
            )
        self.classes: list[str] = classes
        bands = self._meta_json(meta, _META_BANDS) if _META_BANDS in meta else []
        if not isinstance(bands, list) or not all(isinstance(b, str) for b in bands):
            raise DataError(
                f"dataset {self.path}: metadata galpipe.bands must be a list of strings, "
                f"got {bands!r}"
            )
        self.bands: list[str] = bands
        names = set(schema.names)
        for col in (IMAGE, LABEL):
            if col not in names:
                raise DataError(
                    f"dataset {self.path}: column {col!r} is missing (columns: {schema.names})"
                )
        itype = schema.field(IMAGE).type
        size = int(np.prod(self.image_shape))
        if (
            not pa.types.is_fixed_size_list(itype)
            or itype.list_size != size
            or not pa.types.is_floating(itype.value_type)
        ):
            raise DataError(
                f"dataset {self.path}: column 'image' has type {itype}; expected "
                f"fixed_size_list<float32>[{size}] for image_shape {list(self.image_shape)}"
            )
        if not pa.types.is_integer(schema.field(LABEL).type):
            raise DataError(
                f"dataset {self.path}: column 'label_index' has type "
                f"{schema.field(LABEL).type}, expected an integer type"
            )
        md = self._pf.metadata
        self.n_rows: int = int(md.num_rows)
        self._rg_rows = [int(md.row_group(i).num_rows) for i in range(md.num_row_groups)]
        self.peak_buffer_rows = 0

    # -- metadata --------------------------------------------------------------------
    def _meta_json(self, meta: dict[bytes, bytes], key: bytes) -> object:
        if key not in meta:
            raise DataError(
                f"dataset {self.path}: schema metadata lacks {key.decode()} "
                "(not written by galpipe's split stage?)"
            )
        try:
            return json.loads(meta[key])
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(
                f"dataset {self.path}: schema metadata {key.decode()} is not valid JSON ({exc})"
            ) from exc

    @property
    def n_classes(self) -> int:
        """Number of classes ``K``."""
        return len(self.classes)

    @property
    def n_row_groups(self) -> int:
        """Number of Parquet row groups."""
        return len(self._rg_rows)

    @property
    def column_names(self) -> list[str]:
        """Names of all columns of the file."""
        return list(self._pf.schema_arrow.names)

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return (
            f"ParquetImageDataset({str(self.path)!r}, n_rows={self.n_rows}, "
            f"image_shape={self.image_shape}, classes={self.classes})"
        )

    # -- whole columns (small) -------------------------------------------------------
    def labels(self) -> np.ndarray:
        """All ``label_index`` values, shape ``(n_rows,)`` int64 (reads only that column)."""
        return self._read_small_column(LABEL)

    def objids(self) -> np.ndarray:
        """All ``objid`` values, shape ``(n_rows,)`` int64 (reads only that column)."""
        return self._read_small_column(OBJID)

    def _read_small_column(self, name: str) -> np.ndarray:
        if name not in self._pf.schema_arrow.names:
            raise DataError(f"dataset {self.path}: column {name!r} is missing")
        table = self._pf.read(columns=[name])
        return self._convert(table.column(name), name, row0=0)

    # -- conversion ------------------------------------------------------------------
    def _convert(self, col: pa.ChunkedArray, name: str, row0: int) -> np.ndarray:
        """One column of one row group as a numpy array (images ``(n, H, W, C)``)."""
        arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        if arr.null_count:
            raise DataError(
                f"dataset {self.path}: column {name!r} has {arr.null_count} null value(s) "
                f"in the rows starting at {row0}"
            )
        if name == IMAGE:
            flat = arr.flatten().to_numpy(zero_copy_only=False)
            if flat.dtype != np.float32:
                flat = flat.astype(np.float32)
            return flat.reshape(-1, *self.image_shape)
        out = arr.to_numpy(zero_copy_only=False)
        if name == LABEL:
            out = out.astype(np.int64, copy=False)
            if out.size and (out.min() < 0 or out.max() >= self.n_classes):
                bad = int(np.flatnonzero((out < 0) | (out >= self.n_classes))[0])
                raise DataError(
                    f"dataset {self.path}: row {row0 + bad} has label_index {int(out[bad])}, "
                    f"expected 0..{self.n_classes - 1} ({self.n_classes} classes)"
                )
        return out

    def _read_group(self, rg: int, columns: Sequence[str], row0: int) -> list[np.ndarray]:
        try:
            table = self._pf.read_row_group(rg, columns=list(columns))
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"dataset {self.path}: cannot read row group {rg} ({exc})") from exc
        return [self._convert(table.column(c), c, row0) for c in columns]

    # -- iteration -------------------------------------------------------------------
    def iter_batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        buffer_size: int = 2048,
        columns: Sequence[str] = (IMAGE, LABEL),
        drop_last: bool = False,
    ) -> Iterator[tuple[np.ndarray, ...]]:
        """Yield mini-batches of the requested columns.

        Without ``shuffle`` the rows come in file order (for evaluation).  With
        ``shuffle`` the row-group order is permuted and rows pass through a
        bounded shuffle buffer: a row group is appended to the buffer, and while
        the buffer holds at least ``max(buffer_size, batch_size)`` rows a batch
        of rows drawn uniformly without replacement is taken out.  The buffer
        therefore never holds more than ``max(buffer_size, batch_size)`` rows
        plus one row group, the whole file is never loaded, and every row is
        yielded exactly once per epoch.  The order depends only on
        ``(seed, epoch)`` (stream :data:`STREAM_SHUFFLE` of :func:`epoch_rng`).

        Parameters
        ----------
        batch_size : int
            Rows per batch; the last batch may be smaller unless ``drop_last``.
        shuffle : bool
            Shuffle (training) or keep file order (evaluation).
        seed, epoch : int
            Determine the shuffled order.
        buffer_size : int
            Shuffle buffer size in rows (ignored without ``shuffle``).
        columns : sequence of str
            Columns to yield, in order: ``"image"`` gives ``(B, H, W, C)``
            float32, ``"label_index"`` ``(B,)`` int64, ``"objid"`` ``(B,)``
            int64, any other column its numpy conversion.
        drop_last : bool
            Drop a final batch smaller than ``batch_size``.

        Yields
        ------
        tuple of numpy.ndarray
            One array per entry of ``columns``, all with ``B`` rows.
        """
        _check_batch_args(batch_size, buffer_size, columns)
        names = self._pf.schema_arrow.names
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"dataset {self.path}: column(s) {missing} missing (columns: {names})")
        starts = np.concatenate([[0], np.cumsum(self._rg_rows)]).astype(np.int64)
        if not shuffle:
            yield from self._iter_ordered(batch_size, list(columns), starts, drop_last)
            return
        yield from self._iter_shuffled(
            batch_size, list(columns), starts, epoch_rng(seed, epoch, STREAM_SHUFFLE),
            buffer_size, drop_last,
        )

    def _iter_ordered(
        self, batch_size: int, columns: list[str], starts: np.ndarray, drop_last: bool
    ) -> Iterator[tuple[np.ndarray, ...]]:
        pending: list[list[np.ndarray]] = []
        n_pending = 0
        for rg in range(self.n_row_groups):
            if self._rg_rows[rg] == 0:
                continue
            arrays = self._read_group(rg, columns, int(starts[rg]))
            pending.append(arrays)
            n_pending += len(arrays[0])
            if n_pending < batch_size:
                continue
            merged = [np.concatenate([p[j] for p in pending]) for j in range(len(columns))]
            n_full = (n_pending // batch_size) * batch_size
            for i in range(0, n_full, batch_size):
                yield tuple(a[i : i + batch_size] for a in merged)
            rest = [a[n_full:] for a in merged]
            pending, n_pending = ([rest], len(rest[0])) if len(rest[0]) else ([], 0)
        if n_pending and not drop_last:
            yield tuple(np.concatenate([p[j] for p in pending]) for j in range(len(columns)))

    def _iter_shuffled(
        self,
        batch_size: int,
        columns: list[str],
        starts: np.ndarray,
        rng: np.random.Generator,
        buffer_size: int,
        drop_last: bool,
    ) -> Iterator[tuple[np.ndarray, ...]]:
        threshold = max(int(buffer_size), int(batch_size))
        capacity = threshold + max(self._rg_rows, default=0)
        buf: list[np.ndarray] | None = None  # preallocated per column on first row group
        n = 0
        self.peak_buffer_rows = 0
        for rg in rng.permutation(self.n_row_groups):
            if self._rg_rows[rg] == 0:
                continue
            arrays = self._read_group(int(rg), columns, int(starts[rg]))
            m = len(arrays[0])
            if buf is None:
                buf = [np.empty((capacity, *a.shape[1:]), dtype=a.dtype) for a in arrays]
            for b, a in zip(buf, arrays, strict=True):
                b[n : n + m] = a
            n += m
            del arrays
            self.peak_buffer_rows = max(self.peak_buffer_rows, n)
            while n >= threshold:
                idx = rng.choice(n, size=batch_size, replace=False)
                out = tuple(b[idx] for b in buf)
                n = _remove_rows(buf, n, idx)
                yield out
        if buf is None or n == 0:
            return
        perm = rng.permutation(n)
        for i in range(0, n, batch_size):
            sel = perm[i : i + batch_size]
            if drop_last and len(sel) < batch_size:
                return
            yield tuple(b[sel] for b in buf)


def _remove_rows(buf: list[np.ndarray], n: int, idx: np.ndarray) -> int:
    """Remove rows ``idx`` from the first ``n`` rows of every array in ``buf``.

    The holes below the new end are filled with the surviving rows from the
    tail, so the work is proportional to ``len(idx)``, not to ``n``.  Returns
    the new row count.
    """
    new_n = n - len(idx)
    removed = np.zeros(n - new_n, dtype=bool)
    tail_hits = idx[idx >= new_n] - new_n
    removed[tail_hits] = True
    holes = np.sort(idx[idx < new_n])
    movers = new_n + np.flatnonzero(~removed)
    for b in buf:
        b[holes] = b[movers]
    return new_n


class ArrayDataset:
    """In-memory arrays with the :class:`ParquetImageDataset` iteration interface.

    Parameters
    ----------
    x : numpy.ndarray
        Inputs, shape ``(N, ...)``: images ``(N, H, W, C)`` or features ``(N, F)``.
        Kept as given (float32 recommended).
    y : numpy.ndarray
        Integer labels, shape ``(N,)``, values in ``0..K-1``.
    classes : sequence of str, optional
        Class names (default ``["0", ..., str(K-1)]`` with ``K = max(y) + 1``).
    objids : numpy.ndarray, optional
        Object ids, shape ``(N,)`` (default ``arange(N)``).
    bands : sequence of str, optional
        Channel names (informational).
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        classes: Sequence[str] | None = None,
        objids: np.ndarray | None = None,
        bands: Sequence[str] | None = None,
    ) -> None:
        x = np.asarray(x)
        y = np.asarray(y)
        if x.ndim < 2:
            raise DataError(f"ArrayDataset: x must have shape (N, ...), got {x.shape}")
        if y.shape != (x.shape[0],):
            raise DataError(
                f"ArrayDataset: y must have shape (N,) = ({x.shape[0]},), got {y.shape}"
            )
        if y.size and not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"ArrayDataset: y must hold integer labels, got dtype {y.dtype}")
        y = y.astype(np.int64, copy=False)
        if classes is None:
            classes = [str(i) for i in range(int(y.max()) + 1 if y.size else 0)]
        self.classes: list[str] = [str(c) for c in classes]
        if y.size and (y.min() < 0 or y.max() >= len(self.classes)):
            bad = int(np.flatnonzero((y < 0) | (y >= len(self.classes)))[0])
            raise DataError(
                f"ArrayDataset: row {bad} has label {int(y[bad])}, expected "
                f"0..{len(self.classes) - 1}"
            )
        if objids is None:
            objids = np.arange(x.shape[0], dtype=np.int64)
        objids = np.asarray(objids)
        if objids.shape != (x.shape[0],):
            raise DataError(
                f"ArrayDataset: objids must have shape ({x.shape[0]},), got {objids.shape}"
            )
        self.x, self.y, self.ids = x, y, objids
        self.bands: list[str] = list(bands) if bands is not None else []
        self.image_shape: tuple[int, ...] = tuple(int(d) for d in x.shape[1:])
        self.n_rows: int = int(x.shape[0])
        self.peak_buffer_rows = self.n_rows

    @property
    def n_classes(self) -> int:
        """Number of classes ``K``."""
        return len(self.classes)

    @property
    def column_names(self) -> list[str]:
        """Column names understood by :meth:`iter_batches`."""
        return [IMAGE, LABEL, OBJID]

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(n_rows={self.n_rows}, image_shape={self.image_shape}, "
            f"classes={self.classes})"
        )

    def labels(self) -> np.ndarray:
        """All labels, shape ``(N,)`` int64."""
        return self.y

    def objids(self) -> np.ndarray:
        """All object ids, shape ``(N,)``."""
        return self.ids

    def iter_batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        buffer_size: int = 2048,
        columns: Sequence[str] = (IMAGE, LABEL),
        drop_last: bool = False,
    ) -> Iterator[tuple[np.ndarray, ...]]:
        """Yield mini-batches; same contract as :meth:`ParquetImageDataset.iter_batches`.

        The data are in memory, so shuffling is a full permutation drawn from
        stream :data:`STREAM_SHUFFLE` of ``epoch_rng(seed, epoch)``;
        ``buffer_size`` is accepted and ignored.
        """
        _check_batch_args(batch_size, buffer_size, columns)
        source = {IMAGE: self.x, LABEL: self.y, OBJID: self.ids}
        missing = [c for c in columns if c not in source]
        if missing:
            raise DataError(
                f"ArrayDataset: column(s) {missing} unknown; available: {sorted(source)}"
            )
        arrays = [source[c] for c in columns]
        order = (
            epoch_rng(seed, epoch, STREAM_SHUFFLE).permutation(self.n_rows) if shuffle else None
        )
        for i in range(0, self.n_rows, batch_size):
            stop = min(i + batch_size, self.n_rows)
            if drop_last and stop - i < batch_size:
                return
            if order is None:
                yield tuple(a[i:stop] for a in arrays)
            else:
                sel = order[i:stop]
                yield tuple(a[sel] for a in arrays)


Dataset = ParquetImageDataset | ArrayDataset
