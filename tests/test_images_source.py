"""The `images` source: labels CSV checks, loaders, cutouts in the common layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from PIL import Image

from galpipe.config import build_section, load_settings
from galpipe.errors import ConfigError, DataError
from galpipe.io.cutout_fits import read_cutout
from galpipe.sources.base import CutoutCache, Source
from galpipe.sources.images import ImagesSource, build_catalogue, load_image, make_cutouts, read_labels

GZ1_MAP = {"elliptical": "elliptical", "spiral_cw": "spiral", "spiral_acw": "spiral", "edge_on": "spiral",
           "dont_know": None, "merger": None}


def _folder(tmp_path: Path, n: int = 6) -> dict:
    img = tmp_path / "img"
    img.mkdir()
    lines = ["objid,cls,file"]
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
        Image.fromarray(arr).save(img / f"{100 + i}.png" if i % 2 else img / f"{100 + i}.jpeg")
        name = f"{100 + i}.png" if i % 2 else f"{100 + i}.jpeg"
        lines.append(f"{100 + i},{['a', 'b', 'skip'][i % 3]},img/{name}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    return {"directory": str(tmp_path), "labels_csv": str(tmp_path / "labels.csv"), "id_column": "objid",
            "label_column": "cls", "path_column": "file", "label_map": {"a": "x", "b": "y", "skip": None},
            "crop_fraction": 0.8}


def test_text_ids_and_coordinates_are_kept(tmp_path: Path) -> None:
    from galpipe.sources.images import build_catalogue, text_objid

    (tmp_path / "l.csv").write_text("objid,cls,file,ra,dec\nNGC1000,a,x.png,10.5,-2\n7,b,y.png,,\n")
    params = {"directory": str(tmp_path), "labels_csv": str(tmp_path / "l.csv"), "id_column": "objid",
              "label_column": "cls", "path_column": "file", "label_map": {"a": "x", "b": "y"}}
    for name in ("x.png", "y.png"):
        (tmp_path / name).write_bytes(name.encode())
    cat, _ = build_catalogue(params)
    by_name = cat.set_index("name")
    assert by_name.loc["NGC1000", "objid"] == text_objid("NGC1000") and by_name.loc["7", "objid"] == 7
    assert (by_name.loc["NGC1000", "ra"], by_name.loc["NGC1000", "dec"]) == (10.5, -2.0)
    assert np.isnan(by_name.loc["7", "ra"]) and np.isnan(by_name.loc["7", "dec"])
    assert text_objid("NGC1000") == text_objid("NGC1000") != text_objid("NGC1001")


def test_labels_mapping_drops_and_orders(tmp_path: Path) -> None:
    params = _folder(tmp_path)
    df = read_labels(params)
    assert df["objid"].tolist() == [100, 101, 103, 104]
    assert df["label"].tolist() == ["x", "y", "x", "y"]


@pytest.mark.parametrize(
    ("csv", "match"),
    [
        ("objid,cls\n1,a\n", "missing column"),
        ("objid,cls,file\n1,a,x.png\n1,b,y.png\n", "duplicate id"),
        ("objid,cls,file\n,a,x.png\n", "row 2: the id in column 'objid' is empty"),
        ("objid,cls,file\n1,a,x.png\n1,b,y.png\n", "duplicate id"),
        ("objid,cls,file,ra\n1,a,x.png,10\n", "no 'dec' column"),
        ("objid,cls,file,ra,dec\n1,a,x.png,10,\n", "give both or neither"),
        ("objid,cls,file,ra,dec\n1,a,x.png,400,1\n", "outside"),
        ("objid,cls,file\n1,zzz,x.png\n", "row 2: label 'zzz' is not in images.label_map"),
        ("objid,cls,file\n1,a,../../etc/passwd\n", "escapes"),
        ("objid,cls,file\n1,a,/etc/passwd\n", "relative"),
    ],
)
def test_bad_labels_csv(tmp_path: Path, csv: str, match: str) -> None:
    (tmp_path / "l.csv").write_text(csv)
    params = {"directory": str(tmp_path), "labels_csv": str(tmp_path / "l.csv"), "id_column": "objid",
              "label_column": "cls", "path_column": "file", "label_map": {"a": "x", "b": "y"}}
    with pytest.raises(DataError, match=match):
        read_labels(params)


def test_load_image_crop_resize_and_errors(tmp_path: Path) -> None:
    arr = np.zeros((100, 100, 3), np.uint8)
    arr[40:60, 40:60] = 200
    Image.fromarray(arr).save(tmp_path / "a.png")
    data, bunit, bands = load_image(tmp_path / "a.png", size=10, crop_fraction=0.2)
    assert data.shape == (3, 10, 10) and data.dtype == np.uint8 and bunit == "DN"
    assert bands == ["red", "green", "blue"] and data.min() > 150  # only the bright centre kept
    (tmp_path / "z.jpeg").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_image(tmp_path / "z.jpeg", size=8)
    (tmp_path / "t.png").write_bytes((tmp_path / "a.png").read_bytes()[:60])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_image(tmp_path / "t.png", size=8)
    fits.PrimaryHDU(np.full((2, 20, 20), np.nan, np.float32)).writeto(tmp_path / "n.fits")
    with pytest.raises(DataError, match="NaN"):
        load_image(tmp_path / "n.fits", size=8)
    fits.PrimaryHDU(np.ones((2, 20, 30), np.float32)).writeto(tmp_path / "ok.fits")
    d, unit, b = load_image(tmp_path / "ok.fits", size=8)
    assert d.shape == (2, 8, 8) and unit == "nanomaggy" and b == ["band0", "band1"]


def test_make_cutouts_quarantines_and_resumes(tmp_path: Path) -> None:
    params = _folder(tmp_path)
    cat, prov = build_catalogue(params)
    assert prov["class_counts"] == {"x": 2, "y": 2}
    Path(cat["image_path"].iloc[0]).write_bytes(b"not an image")
    out = CutoutCache(tmp_path / "cut")
    man = make_cutouts(cat, out, size=16, crop_fraction=params["crop_fraction"])
    assert man["status"].tolist() == ["failed", "ok", "ok", "ok"]
    assert "corrupt" in man["reason"].iloc[0]
    c = read_cutout(man["path"].iloc[1])
    assert c.data.shape == (3, 16, 16) and c.bunit == "DN" and c.objid == 101
    mtimes = [Path(p).stat().st_mtime_ns for p in man["path"].iloc[1:]]
    man2 = make_cutouts(cat, out, size=16, crop_fraction=params["crop_fraction"])
    assert [Path(p).stat().st_mtime_ns for p in man2["path"].iloc[1:]] == mtimes


def test_real_gz1_labels(gz1_dir: Path) -> None:
    params = {"directory": str(gz1_dir), "labels_csv": str(gz1_dir / "labels.csv"), "id_column": "objid",
              "label_column": "gz1_class_name", "path_column": "image", "label_map": GZ1_MAP}
    df = read_labels(params)
    counts = df["label"].value_counts().to_dict()
    assert counts == {"elliptical": 2826, "spiral": 585 + 269 + 260}
    data, bunit, _ = load_image(df["image_path"].iloc[0], size=64, crop_fraction=0.5)
    assert data.shape == (3, 64, 64) and bunit == "DN" and data.max() > 50


# --------------------------------------------------------------------------- the Source class
def test_images_source_implements_the_interface(tmp_path: Path) -> None:
    params = _folder(tmp_path, n=9)  # 3 images per class, one for each split (validation refuses fewer)
    cfg = load_settings({"source": "images", "images": params, "cutout_size": 16, "seed": 3})
    src = ImagesSource(cfg)
    assert isinstance(src, Source) and src.name == "images"
    assert src.bands is None and src.crop_fraction == 0.8
    # params: no bands (the files decide), as today's stage_config
    assert src.params() == {"source": "images", "seed": 3, "images": cfg.images.to_dict(), "cutout_size": 16}
    df, prov = src.catalogue()
    assert df["objid"].tolist() == [100, 101, 103, 104, 106, 107]
    assert "created_utc" not in prov and prov["class_counts"] == {"x": 3, "y": 3}
    # the catalogue reads the labels CSV; each shard's cutouts read its images (not the dropped 'skip'
    # rows), dealt into shards exactly as the catalogue stage deals them
    assert src.input_files() == [Path(params["labels_csv"])]
    by_shard = src.shard_input_files(2)
    from galpipe.catalogue import shard_catalogue

    assert by_shard == [[Path(p) for p in part["image_path"]] for part in shard_catalogue(df, 2)]
    assert sorted(p for part in by_shard for p in part) == sorted(Path(p) for p in df["image_path"])
    man = src.make_cutouts(df, CutoutCache(tmp_path / "cut"))
    assert (man["status"] == "ok").all()
    # load_external makes exactly the pixels make_cutouts wrote
    ext = ImagesSource.load_external(df["image_path"].iloc[1], size=16, crop_fraction=src.crop_fraction)
    cut = read_cutout(man["path"].iloc[1])
    np.testing.assert_array_equal(ext.data, cut.data)
    assert ext.bands == ("red", "green", "blue") and ext.bunit == "DN"


def test_input_files_without_a_labels_csv(tmp_path: Path) -> None:
    cfg = load_settings({"source": "images", "images": {"directory": str(tmp_path),
                                                        "labels_csv": str(tmp_path / "missing.csv")}})
    assert ImagesSource(cfg).input_files() == [tmp_path / "missing.csv"]
    assert ImagesSource(cfg).shard_input_files(3) == [[], [], []]


def test_images_source_needs_folder_and_csv() -> None:
    with pytest.raises(ConfigError, match=r"config key 'images\.directory'"):
        load_settings({"source": "images"})
    assert build_section("images").directory is None  # fine while another source is configured
