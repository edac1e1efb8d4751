"""Catalogue checks, sharding, normalisation and the leak-free deterministic split."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from galpipe.catalogue import check_catalogue, read_catalogue, shard_catalogue, write_catalogue, write_shards
from galpipe.config import build_section
from galpipe.errors import DataError
from galpipe.io.cutout_fits import read_cutout, write_cutout
from galpipe.io.parquet import read_metadata
from galpipe.stages.normalise import normalise_array, normalise_shard, read_images
from galpipe.stages.split import allocate, assign_splits, split_dataset

#: The normalise section with the schema's defaults.
NORM = build_section("normalise")


def _cat(n: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = np.array(["elliptical", "spiral", "edge_on"])[np.arange(n) % 3]
    return pd.DataFrame({"objid": rng.permutation(np.arange(1000, 1000 + n)).astype(np.int64),
                         "ra": rng.uniform(150, 200, n), "dec": rng.uniform(0, 40, n),
                         "label": labels, "petroMag_r": rng.uniform(14, 17.7, n)})


def test_check_catalogue_rejects_bad_tables() -> None:
    df = _cat()
    with pytest.raises(DataError, match="missing column"):
        check_catalogue(df.drop(columns=["label"]))
    with pytest.raises(DataError, match="empty"):
        check_catalogue(df.iloc[:0])
    dup = pd.concat([df, df.iloc[:1]])
    with pytest.raises(DataError, match="duplicate objid"):
        check_catalogue(dup)
    with pytest.raises(DataError, match="integers"):
        check_catalogue(df.assign(objid=df["objid"].astype(str)))
    out = check_catalogue(df)
    assert out["objid"].is_monotonic_increasing


def test_catalogue_roundtrip_keeps_provenance(tmp_path: Path) -> None:
    p = tmp_path / "cat.parquet"
    write_catalogue(_cat(), p, {"sql": "SELECT 1", "data_release": 17})
    assert read_metadata(p)["provenance"] == {"sql": "SELECT 1", "data_release": 17}
    assert len(read_catalogue(p)) == 60


def test_shards_are_balanced_deterministic_and_complete(tmp_path: Path) -> None:
    df = _cat(61)
    shards = shard_catalogue(df, 4)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 61
    assert sorted(pd.concat(shards)["objid"]) == sorted(df["objid"])
    again = shard_catalogue(df.sample(frac=1, random_state=3), 4)
    for a, b in zip(shards, again, strict=True):
        pd.testing.assert_frame_equal(a, b)
    paths = [tmp_path / f"{i}.parquet" for i in range(8)]
    write_shards(df.iloc[:5], paths, {})
    assert sum(len(read_catalogue(p, allow_empty=True)) for p in paths) == 5


def _fields_cat(n: int = 90, seed: int = 1) -> pd.DataFrame:
    """A catalogue whose galaxies sit on SDSS fields (1 to 6 galaxies each, as a run gives them)."""
    rng = np.random.default_rng(seed)
    cat = _cat(n, seed)
    sizes = rng.integers(1, 7, size=n)
    field = np.repeat(np.arange(len(sizes)), sizes)[:n]
    return cat.assign(run=3704, rerun=301, camcol=1 + field % 3, field=11 + field // 3)


FIELD = ["run", "rerun", "camcol", "field"]


@pytest.mark.parametrize("n_shards", [1, 2, 4, 7])
def test_shards_grouped_by_field_keep_fields_whole_balanced_and_deterministic(n_shards: int) -> None:
    """Issue 13 item 8: with the sdss-frames grouping, no field is split over shards."""
    df = _fields_cat()
    shards = shard_catalogue(df, n_shards, group_columns=FIELD)
    assert len(shards) == n_shards
    assert sorted(pd.concat(shards)["objid"]) == sorted(df["objid"])  # complete, no duplicates
    owner: dict[tuple[int, ...], int] = {}
    for i, part in enumerate(shards):
        assert part["objid"].is_monotonic_increasing and list(part.columns) == list(df.columns)
        for key in map(tuple, part[FIELD].to_numpy()):
            assert owner.setdefault(key, i) == i, f"field {key} is in shards {owner[key]} and {i}"
    sizes = [len(p) for p in shards]
    largest = int(df.groupby(FIELD).size().max())
    assert max(sizes) - min(sizes) <= largest
    again = shard_catalogue(df.sample(frac=1, random_state=5).reset_index(drop=True), n_shards, group_columns=FIELD)
    for a, b in zip(shards, again, strict=True):
        pd.testing.assert_frame_equal(a, b)
    if n_shards > 1:  # per-galaxy dealing, the old behaviour, splits fields
        split = shard_catalogue(df, n_shards)
        assert sum(len(p[FIELD].drop_duplicates()) for p in split) > len(owner)


def test_grouped_shards_refuse_missing_group_columns_and_record_the_grouping(tmp_path: Path) -> None:
    df = _fields_cat(20)
    with pytest.raises(DataError, match="missing column"):
        shard_catalogue(df.drop(columns=["camcol"]), 2, group_columns=FIELD)
    holes = df.assign(field=df["field"].astype(float))
    holes.loc[3, "field"] = np.nan
    with pytest.raises(DataError, match=f"objid {df['objid'].iloc[3]}: column 'field' is missing"):
        shard_catalogue(holes, 2, group_columns=FIELD)
    paths = [tmp_path / f"{i}.parquet" for i in range(3)]
    write_shards(df, paths, {}, group_columns=FIELD)
    assert read_metadata(paths[0])["shard_group_columns"] == FIELD
    assert sum(len(read_catalogue(p, allow_empty=True)) for p in paths) == 20
    write_shards(df, paths, {})
    assert read_metadata(paths[1])["shard_group_columns"] == [] and read_metadata(paths[1])["shard"] == [1, 3]


def test_allocate_counts() -> None:
    assert allocate(10, [0.7, 0.15, 0.15]) == [7, 2, 1] or allocate(10, [0.7, 0.15, 0.15]) == [7, 1, 2]
    assert sum(allocate(101, [0.7, 0.15, 0.15])) == 101
    assert allocate(3, [0.98, 0.01, 0.01]) == [1, 1, 1]


def test_assign_splits_stratified_grouped_deterministic() -> None:
    df = _cat(300)
    fr = {"train": 0.7, "validation": 0.15, "test": 0.15}
    a = assign_splits(df["objid"].to_numpy(), df["label"].to_numpy(), fr, seed=1)
    b = assign_splits(df["objid"].to_numpy()[::-1], df["label"].to_numpy()[::-1], fr, seed=1)[::-1]
    assert (a == b).all()  # independent of row order
    c = assign_splits(df["objid"].to_numpy(), df["label"].to_numpy(), fr, seed=2)
    assert (a != c).any()
    for cls in ("elliptical", "spiral", "edge_on"):
        m = df["label"].to_numpy() == cls
        counts = pd.Series(a[m]).value_counts()
        assert counts["train"] == 70 and counts["validation"] == 15 and counts["test"] == 15
    groups = df["objid"].to_numpy() % 50  # several rows per group: never in two splits
    g = assign_splits(df["objid"].to_numpy(), df["label"].to_numpy(), fr, seed=1, group=groups)
    for key in np.unique(groups):
        assert len(set(g[groups == key])) == 1


def test_normalise_array_asinh_dn_and_bad_pixels() -> None:
    flux = np.zeros((3, 4, 4), np.float32)
    flux[0, 0, 0] = np.nan
    flux[1, 1, 1] = np.inf
    flux[2, 2, 2] = 100.0
    img, n_bad = normalise_array(flux, "nanomaggy", build_section(
        "normalise", {"softening": 0.1, "reference_flux": 100.0, "clip": [-0.5, 1.5], "bad_pixel_value": -0.25}))
    assert img.shape == (4, 4, 3) and img.dtype == np.float32
    assert n_bad == 2
    assert img[0, 0, 0] == np.float32(-0.25) and img[1, 1, 1] == np.float32(-0.25)
    assert img[2, 2, 2] == pytest.approx(1.0)
    assert img[3, 3, 0] == 0.0
    dn = np.full((3, 2, 2), 255, np.uint8)
    out, _ = normalise_array(dn, "DN", NORM)
    assert np.all(out == 1.0)
    with pytest.raises(DataError, match="NaN"):
        normalise_array(np.full((1, 2, 2), np.nan, np.float32), "nanomaggy", NORM)


def _write_shard(tmp_path: Path, df: pd.DataFrame, name: str, corrupt: int | None = None) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    rows = []
    for row in df.itertuples():
        p = tmp_path / "cut" / f"{row.objid}.fits"
        write_cutout(p, rng.normal(0, 1, (3, 8, 8)).astype(np.float32), bands=["g", "r", "i"],
                     objid=row.objid, ra=row.ra, dec=row.dec, source="simulated")
        if corrupt is not None and row.objid == corrupt:
            p.write_bytes(p.read_bytes()[:1000])
        rows.append((row.objid, str(p), "ok", "", 0))
    man = tmp_path / f"{name}.manifest.parquet"
    pd.DataFrame(rows, columns=["objid", "path", "status", "reason", "n_filled"]).to_parquet(man)
    shard = tmp_path / f"{name}.shard.parquet"
    write_catalogue(df, shard, {})
    return man, shard


def test_normalise_shard_and_split_end_to_end(tmp_path: Path) -> None:
    df = _cat(90)
    shards = shard_catalogue(df, 2)
    outs = []
    for i, part in enumerate(shards):
        corrupt = int(part["objid"].iloc[0]) if i == 0 else None
        man, shard = _write_shard(tmp_path, part, f"s{i}", corrupt)
        out = tmp_path / f"n{i}.parquet"
        stats = normalise_shard(man, shard, out, tmp_path / f"r{i}.parquet", params=NORM, size=8,
                                bands=["g", "r", "i"], max_reject_fraction=0.1)
        outs.append(out)
        assert stats["n_rejected"] == (1 if i == 0 else 0)
    rej = pd.read_parquet(tmp_path / "r0.parquet")
    assert rej["stage"].tolist() == ["normalise"]
    assert "readable" in rej["reason"].iloc[0] or "truncated" in rej["reason"].iloc[0]
    imgs, rest = read_images(outs[1])
    assert imgs.shape == (45, 8, 8, 3) and "petroMag_r" in rest
    fr = {"train": 0.6, "validation": 0.2, "test": 0.2}
    o = {s: tmp_path / f"{s}.parquet" for s in ("train", "validation", "test")}
    summary = split_dataset(outs, o, fractions=fr, seed=3, row_group_size=16)
    ids = [set(pd.read_parquet(o[s], columns=["objid"])["objid"]) for s in o]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert sum(len(x) for x in ids) == 89
    meta = read_metadata(o["train"])
    assert meta["image_shape"] == [8, 8, 3] and meta["classes"] == ["edge_on", "elliptical", "spiral"]
    assert pq.ParquetFile(o["train"]).metadata.row_group(0).num_rows == 16
    assert summary["n"] == 89
    t = pd.read_parquet(o["train"], columns=["label", "label_index"])
    assert (t["label_index"] == t["label"].map({"edge_on": 0, "elliptical": 1, "spiral": 2})).all()
    # deterministic: same inputs and seed -> byte-identical files
    o2 = {s: tmp_path / f"{s}-2.parquet" for s in o}
    split_dataset(outs, o2, fractions=fr, seed=3, row_group_size=16)
    for s in o:
        assert hashlib.sha256(o[s].read_bytes()).digest() == hashlib.sha256(o2[s].read_bytes()).digest()
    assert not list(tmp_path.glob(".*.tmp"))


def test_normalise_fails_past_reject_threshold(tmp_path: Path) -> None:
    df = _cat(6)
    man, shard = _write_shard(tmp_path, df, "s", corrupt=int(df["objid"].iloc[0]))
    with pytest.raises(DataError, match="1 of 6 galaxies rejected"):
        normalise_shard(man, shard, tmp_path / "n.parquet", tmp_path / "r.parquet", params=NORM, size=8, bands=None,
                        max_reject_fraction=0.0)
    assert not (tmp_path / "n.parquet").exists()


def test_cutout_roundtrip_and_wcs(tmp_path: Path) -> None:
    from astropy.io import fits
    from astropy.wcs import WCS

    data = np.arange(2 * 9 * 9, dtype=np.float32).reshape(2, 9, 9)
    p = write_cutout(tmp_path / "1.fits", data, bands=["g", "r"], objid=1, ra=180.0, dec=10.0, source="simulated")
    c = read_cutout(p, bands=["g", "r"])
    assert np.array_equal(c.data, data) and c.objid == 1 and c.bunit == "nanomaggy"
    with fits.open(p) as h:
        w = WCS(h["G"].header)
        ra, dec = w.pixel_to_world_values(4, 4)
        assert ra == pytest.approx(180.0) and dec == pytest.approx(10.0)
    with pytest.raises(DataError, match="bands"):
        read_cutout(p, bands=["g", "i"])
    (tmp_path / "empty.fits").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        read_cutout(tmp_path / "empty.fits")


def test_normalise_streams_row_groups(tmp_path: Path) -> None:
    df = _cat(40)
    man, shard = _write_shard(tmp_path, df, "s")
    out = tmp_path / "n.parquet"
    normalise_shard(man, shard, out, tmp_path / "r.parquet", params=NORM, size=8, bands=None,
                    max_reject_fraction=0.0, row_group_rows=16)
    md = pq.ParquetFile(out).metadata
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [16, 16, 8]
    imgs, rest = read_images(out)
    assert imgs.shape == (40, 8, 8, 3) and rest["objid"].is_monotonic_increasing
