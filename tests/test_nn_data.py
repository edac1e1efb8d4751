"""Tests of galpipe.nn.data (Parquet streaming) and galpipe.nn.augment (D4 symmetries)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from nn_fixtures import CLASSES, write_split_parquet

from galpipe.errors import ConfigError, DataError
from galpipe.nn.augment import (
    dihedral,
    dihedral_compose,
    dihedral_inverse,
    random_augment,
)
from galpipe.nn.data import ArrayDataset, ParquetImageDataset


@pytest.fixture
def split_file(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """1000 rows of 6x5x3 images in row groups of 64 (the last one partial)."""
    rng = np.random.default_rng(3)
    n = 1000
    x = rng.normal(size=(n, 6, 5, 3)).astype(np.float32)
    x[:, 0, 0, 0] = np.arange(n)  # row identity, survives the round trip exactly
    y = rng.integers(0, 3, n)
    ids = np.arange(5000, 5000 + n, dtype=np.int64)
    path = write_split_parquet(
        tmp_path / "train.parquet", x, y, objids=ids, row_group_size=64,
        extra={"ra": rng.uniform(0, 360, n)},
    )
    return path, x, y, ids


def test_metadata_and_columns(split_file):
    path, _x, y, ids = split_file
    ds = ParquetImageDataset(path)
    assert ds.n_rows == len(ds) == 1000
    assert ds.image_shape == (6, 5, 3)
    assert ds.classes == CLASSES and ds.n_classes == 3
    assert ds.bands == ["g", "r", "i"]
    assert ds.n_row_groups == 16
    np.testing.assert_array_equal(ds.labels(), y)
    np.testing.assert_array_equal(ds.objids(), ids)
    assert ds.labels().dtype == np.int64


def test_ordered_iteration_round_trips(split_file):
    path, x, y, ids = split_file
    ds = ParquetImageDataset(path)
    batches = list(ds.iter_batches(100, columns=("image", "label_index", "objid")))
    # 64-row groups do not align with 100-row batches: batches span row groups
    assert [len(b[0]) for b in batches] == [100] * 10
    xb = np.concatenate([b[0] for b in batches])
    assert xb.dtype == np.float32 and xb.shape == (1000, 6, 5, 3)
    np.testing.assert_array_equal(xb, x)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)
    np.testing.assert_array_equal(np.concatenate([b[2] for b in batches]), ids)
    sizes = [len(b[0]) for b in ds.iter_batches(300)]
    assert sizes == [300, 300, 300, 100]
    assert [len(b[0]) for b in ds.iter_batches(300, drop_last=True)] == [300, 300, 300]


@pytest.mark.parametrize("buffer_size", [1, 50, 256, 5000])
@pytest.mark.parametrize("batch_size", [1, 32, 100])
def test_shuffled_epoch_covers_every_row_once(split_file, buffer_size, batch_size):
    path, x, y, ids = split_file
    ds = ParquetImageDataset(path)
    seen = []
    for xb, yb, ib in ds.iter_batches(
        batch_size, shuffle=True, seed=7, epoch=0, buffer_size=buffer_size,
        columns=("image", "label_index", "objid"),
    ):
        assert xb.shape[1:] == (6, 5, 3) and xb.dtype == np.float32
        assert yb.dtype == np.int64 and len(yb) == len(xb) == len(ib) <= batch_size
        rows = xb[:, 0, 0, 0].astype(np.int64)
        # images, labels and objids of a row stay together through the buffer
        np.testing.assert_array_equal(xb, x[rows])
        np.testing.assert_array_equal(yb, y[rows])
        np.testing.assert_array_equal(ib, ids[rows])
        seen.append(rows)
    rows = np.concatenate(seen)
    assert np.array_equal(np.sort(rows), np.arange(1000))
    # memory bound: never more than the buffer (or one batch) plus one row group
    assert ds.peak_buffer_rows <= max(buffer_size, batch_size) + 64
    if buffer_size < 1000:
        assert ds.peak_buffer_rows < 1000  # never the whole file


def test_shuffle_deterministic_and_differs_between_epochs(split_file):
    path = split_file[0]

    def order(seed: int, epoch: int) -> np.ndarray:
        ds = ParquetImageDataset(path)  # a fresh object: no hidden state carried over
        return np.concatenate(
            [xb[:, 0, 0, 0] for xb, _ in ds.iter_batches(
                32, shuffle=True, seed=seed, epoch=epoch, buffer_size=200)]
        )

    a = order(1, 0)
    np.testing.assert_array_equal(a, order(1, 0))
    assert not np.array_equal(a, order(1, 1))
    assert not np.array_equal(a, order(2, 0))
    assert not np.array_equal(a, np.arange(1000))
    # the buffer mixes rows from different row groups within a batch
    first = ParquetImageDataset(path).iter_batches(32, shuffle=True, seed=1, buffer_size=200)
    groups = np.unique(next(first)[0][:, 0, 0, 0].astype(int) // 64)
    assert len(groups) > 1


def test_shuffle_quality_spreads_rows(split_file):
    """With a buffer of 256, the row positions decorrelate from file order."""
    ds = ParquetImageDataset(split_file[0])
    rows = np.concatenate(
        [xb[:, 0, 0, 0] for xb, _ in ds.iter_batches(50, shuffle=True, seed=0, buffer_size=256)]
    )
    corr = np.corrcoef(rows, np.arange(1000))[0, 1]
    assert corr < 0.9


def test_array_dataset_same_interface():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(103, 4)).astype(np.float32)
    y = rng.integers(0, 4, 103)
    ds = ArrayDataset(x, y, classes=["a", "b", "c", "d"])
    assert ds.image_shape == (4,) and ds.n_rows == 103 and ds.n_classes == 4
    ordered = list(ds.iter_batches(25, columns=("image", "label_index", "objid")))
    assert [len(b[0]) for b in ordered] == [25, 25, 25, 25, 3]
    np.testing.assert_array_equal(np.concatenate([b[2] for b in ordered]), np.arange(103))
    e0 = np.concatenate([b[0] for b in ds.iter_batches(25, shuffle=True, seed=4, epoch=0,
                                                       columns=("objid",))])
    e0b = np.concatenate([b[2] for b in ds.iter_batches(25, shuffle=True, seed=4, epoch=0,
                                                        columns=("image", "label_index",
                                                                 "objid"))])
    e1 = np.concatenate([b[0] for b in ds.iter_batches(25, shuffle=True, seed=4, epoch=1,
                                                       columns=("objid",))])
    np.testing.assert_array_equal(e0, e0b)
    assert sorted(e0) == list(range(103)) and not np.array_equal(e0, e1)
    assert ArrayDataset(x, y).classes == ["0", "1", "2", "3"]
    with pytest.raises(DataError, match="row"):
        ArrayDataset(x, y, classes=["a", "b"])
    with pytest.raises(DataError, match=r"shape \(N,\)"):
        ArrayDataset(x, y[:5])


def test_bad_files_are_reported(tmp_path: Path, split_file):
    with pytest.raises(DataError, match="not found"):
        ParquetImageDataset(tmp_path / "missing.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk\.parquet"):
        ParquetImageDataset(junk)
    # no galpipe metadata
    table = pq.read_table(split_file[0]).replace_schema_metadata({})
    pq.write_table(table, tmp_path / "nometa.parquet")
    with pytest.raises(DataError, match=r"galpipe\.image_shape"):
        ParquetImageDataset(tmp_path / "nometa.parquet")
    # image size does not match the declared shape
    table = pq.read_table(split_file[0])
    meta = dict(table.schema.metadata)
    meta[b"galpipe.image_shape"] = json.dumps([6, 6, 3]).encode()
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "shape.parquet")
    with pytest.raises(DataError, match=r"fixed_size_list<float32>\[108\]"):
        ParquetImageDataset(tmp_path / "shape.parquet")
    # label_index out of range: the row is named
    labels = np.zeros(10, dtype=np.int32)
    labels[7] = 5
    write_split_parquet(tmp_path / "lab.parquet", np.zeros((10, 2, 2, 1)), np.zeros(10),
                        row_group_size=4)
    t = pq.read_table(tmp_path / "lab.parquet")
    t = t.set_column(t.schema.get_field_index("label_index"), "label_index",
                     pa.array(labels, type=pa.int32()))
    pq.write_table(t, tmp_path / "lab.parquet", row_group_size=4)
    ds = ParquetImageDataset(tmp_path / "lab.parquet")
    with pytest.raises(DataError, match="row 7 has label_index 5"):
        list(ds.iter_batches(3))
    with pytest.raises(ConfigError, match="batch_size"):
        next(ds.iter_batches(0))
    with pytest.raises(DataError, match="nope"):
        next(ds.iter_batches(2, columns=("image", "nope")))


# --------------------------------------------------------------------------- augmentation
@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(4, 7, 7, 3)).astype(np.float32)


def test_dihedral_elements_distinct_and_shapes(images):
    outs = [dihedral(images, k) for k in range(8)]
    for k, o in enumerate(outs):
        assert o.shape == images.shape and o.dtype == images.dtype
        for j in range(k):
            assert not np.array_equal(o, outs[j]), (j, k)
    np.testing.assert_array_equal(outs[0], images)
    np.testing.assert_array_equal(outs[1], np.rot90(images, 1, axes=(1, 2)))
    np.testing.assert_array_equal(outs[4], images[:, :, ::-1])


def test_dihedral_group_structure(images):
    for a in range(8):
        np.testing.assert_array_equal(dihedral(dihedral(images, a), dihedral_inverse(a)), images)
        for b in range(8):
            np.testing.assert_array_equal(
                dihedral(dihedral(images, b), a), dihedral(images, dihedral_compose(a, b))
            )
    # closure: the Cayley table is a Latin square
    table = np.array([[dihedral_compose(a, b) for b in range(8)] for a in range(8)])
    for i in range(8):
        assert sorted(table[i]) == list(range(8)) and sorted(table[:, i]) == list(range(8))
    # four rotations compose to the identity; mirrors are involutions
    np.testing.assert_array_equal(dihedral(dihedral(dihedral(dihedral(images, 1), 1), 1), 1),
                                  images)


def test_dihedral_channels_untouched(images):
    for k in range(8):
        out = dihedral(images, k)
        for c in range(3):
            np.testing.assert_array_equal(out[..., c], dihedral(images[..., c:c + 1], k)[..., 0])
            np.testing.assert_allclose(np.sort(out[..., c].ravel()),
                                       np.sort(images[..., c].ravel()))


def test_dihedral_errors():
    with pytest.raises(ConfigError, match=r"0\.\.7"):
        dihedral(np.zeros((1, 2, 2, 1)), 8)
    with pytest.raises(DataError, match="square"):
        dihedral(np.zeros((1, 2, 3, 1)), 1)
    np.testing.assert_array_equal(dihedral(np.ones((1, 2, 3, 1)), 2).shape, (1, 2, 3, 1))


def test_random_augment(images):
    rng = np.random.default_rng(5)
    big = np.repeat(images[:1], 64, axis=0)
    out = random_augment(big, rng)
    assert out.shape == big.shape and out.dtype == big.dtype
    # every image is one of the 8 symmetries of the original, and several are used
    variants = [dihedral(images[:1], k)[0] for k in range(8)]
    used = {next(k for k, v in enumerate(variants) if np.array_equal(o, v)) for o in out}
    assert len(used) >= 6
    # deterministic given the generator state; input untouched
    before = big.copy()
    a = random_augment(big, np.random.default_rng(9), max_shift=2)
    b = random_augment(big, np.random.default_rng(9), max_shift=2)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(big, before)
    # shifts are circular: the multiset of pixel values per channel is preserved
    s = random_augment(images, np.random.default_rng(2), flips_rotations=False, max_shift=3)
    for i in range(4):
        for c in range(3):
            np.testing.assert_array_equal(np.sort(s[i, ..., c].ravel()),
                                          np.sort(images[i, ..., c].ravel()))
    r = np.random.default_rng(2).integers(-3, 4, size=(4, 2))
    for i in range(4):
        np.testing.assert_array_equal(s[i], np.roll(images[i], tuple(r[i]), axis=(0, 1)))
    none = random_augment(images, rng, flips_rotations=False, max_shift=0)
    np.testing.assert_array_equal(none, images)
    assert none is not images
    with pytest.raises(ConfigError, match="max_shift"):
        random_augment(images, rng, max_shift=-1)
