"""Bad input, clear errors: every malformed file, table row or config value stops galpipe with a
:class:`~galpipe.errors.GalpipeError` naming the file/row/key and what was expected; per-galaxy
problems are quarantined when ``max_reject_fraction`` allows it and fail the stage otherwise.
"""

from __future__ import annotations

import re
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from PIL import Image
from robust_fixtures import ROBUST_TINY, check_ok, run_workflow, write_config

from galpipe.catalogue import check_catalogue, read_catalogue
from galpipe.config import build_section, validate_config
from galpipe.errors import ConfigError, DataError, ModelError
from galpipe.io.cutout_fits import read_cutout, write_cutout
from galpipe.sources.images import load_image, read_labels
from galpipe.stages import cutout_cache_dir, stage_params
from galpipe.stages.catalogue import run as run_catalogue
from galpipe.stages.cutouts import run as run_cutouts
from galpipe.stages.normalise import normalise_array
from galpipe.stages.normalise import run as run_normalise
from galpipe.stages.train import check_architectures

#: Peak Python allocation allowed while rejecting a file that claims huge dimensions.
SMALL_ALLOCATION = 8_000_000

#: The normalise section with the schema's defaults.
NORM = build_section("normalise")


# --------------------------------------------------------------------------- helpers
def _rgb(path: Path, seed: int = 0, size: int = 24) -> Path:
    arr = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=90) if path.suffix == ".jpg" else Image.fromarray(arr).save(path)
    return path


def _cutout(path: Path, bands: tuple[str, ...] = ("g", "r", "i"), size: int = 16, fill: float | None = None) -> Path:
    data = np.random.default_rng(1).normal(size=(len(bands), size, size)).astype(np.float32)
    if fill is not None:
        data[:] = fill
    return write_cutout(path, data, bands=list(bands), objid=7, ra=10.0, dec=1.0, source="simulated")


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A small PNG whose IHDR claims ``width`` x ``height`` pixels (a decompression bomb header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _fits_header_only(path: Path, naxes: list[int], bitpix: int = -32) -> Path:
    h = fits.Header()
    h["SIMPLE"] = True
    h["BITPIX"] = bitpix
    h["NAXIS"] = len(naxes)
    for k, n in enumerate(naxes, start=1):
        h[f"NAXIS{k}"] = n
    path.write_bytes(h.tostring().encode("ascii") + b"\0" * 2880)
    return path


def _peak_while(func, *args, **kwargs) -> tuple[BaseException | None, int]:
    tracemalloc.start()
    try:
        func(*args, **kwargs)
        err = None
    except BaseException as exc:  # returned to the caller for assertions
        err = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return err, peak


def _labels(tmp_path: Path, text: str, **params) -> dict:
    (tmp_path / "labels.csv").write_text(text, encoding="utf-8")
    return {"directory": str(tmp_path), "labels_csv": str(tmp_path / "labels.csv"), "id_column": "objid",
            "label_column": "label", "path_column": "image", "label_map": {}, **params}


# --------------------------------------------------------------------------- image and cutout files
@pytest.mark.parametrize("suffix", [".fits", ".jpg", ".png"])
def test_zero_byte_file(tmp_path: Path, suffix: str) -> None:
    p = tmp_path / f"empty{suffix}"
    p.write_bytes(b"")
    with pytest.raises(DataError, match=rf"{re.escape(str(p))}: file is empty \(0 bytes\)"):
        load_image(p, size=8)
    if suffix == ".fits":
        with pytest.raises(DataError, match=rf"cutout {re.escape(str(p))}: file is empty"):
            read_cutout(p)


@pytest.mark.parametrize("suffix", [".fits", ".jpg", ".png"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    good = _cutout(tmp_path / "good.fits") if suffix == ".fits" else _rgb(tmp_path / f"good{suffix}")
    p = tmp_path / f"truncated{suffix}"
    p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match=re.escape(str(p))) as info:
        load_image(p, size=8)
    assert re.search(r"truncated|expected 3 image HDUs", str(info.value)), info.value
    if suffix == ".fits":
        with pytest.raises(DataError, match=rf"{re.escape(str(p))}: expected 3 image HDUs for bands"):
            read_cutout(p)


@pytest.mark.parametrize("suffix", [".fits", ".jpg", ".png"])
def test_corrupt_file(tmp_path: Path, suffix: str) -> None:
    p = tmp_path / f"corrupt{suffix}"
    p.write_bytes(np.random.default_rng(3).integers(0, 256, 6000, dtype=np.uint8).tobytes())
    expected = "not a readable FITS file" if suffix == ".fits" else "corrupt or truncated image"
    with pytest.raises(DataError, match=rf"{re.escape(str(p))}: {expected}"):
        load_image(p, size=8)
    if suffix == ".fits":
        with pytest.raises(DataError, match=rf"cutout {re.escape(str(p))}: not a readable FITS file"):
            read_cutout(p)


def test_fits_with_the_wrong_number_of_bands(tmp_path: Path) -> None:
    two = _cutout(tmp_path / "two.fits", bands=("g", "r"))
    with pytest.raises(DataError, match=r"two\.fits: has bands \['g', 'r'\], expected \['g', 'r', 'i'\]"):
        read_cutout(two, bands=["g", "r", "i"])
    # header says three bands, the file holds two image HDUs
    lying = tmp_path / "lying.fits"
    with fits.open(two) as hdul:
        hdul[0].header["BANDS"] = "g,r,i"
        hdul.writeto(lying)
    with pytest.raises(DataError, match=r"lying\.fits: expected 3 image HDUs for bands \['g', 'r', 'i'\], found 2"):
        read_cutout(lying)


def test_nan_only_and_infinite_pixels(tmp_path: Path) -> None:
    for name, value in (("nan.fits", np.nan), ("inf.fits", np.inf)):
        plain = tmp_path / name
        fits.PrimaryHDU(np.full((10, 10), value, np.float32)).writeto(plain)
        with pytest.raises(DataError, match=rf"{name}: every pixel is NaN or infinite"):
            load_image(plain, size=8)
    cut = read_cutout(_cutout(tmp_path / "nan_cutout.fits", fill=np.nan))
    with pytest.raises(DataError, match="every pixel is NaN or infinite"):
        normalise_array(cut.data, cut.bunit, NORM)
    # a few bad pixels are replaced and counted, not fatal
    data = np.ones((3, 8, 8), np.float32)
    data[0, 0, 0], data[1, 2, 3], data[2, 5, 5] = np.nan, np.inf, -np.inf
    img, n_bad = normalise_array(data, "nanomaggy", build_section("normalise", {"bad_pixel_value": 0.25}))
    assert n_bad == 3 and np.isfinite(img).all()
    assert img[0, 0, 0] == np.float32(0.25) and img.shape == (8, 8, 3)


def test_absurd_naxis_is_rejected_before_any_large_allocation(tmp_path: Path) -> None:
    huge = _fits_header_only(tmp_path / "huge.fits", [100_000, 100_000])  # claims 40 GB, holds 5 kB
    err, peak = _peak_while(load_image, huge, size=8)
    assert isinstance(err, DataError) and "huge.fits: FITS axes [100000, 100000] are out of range" in str(err)
    assert peak < SMALL_ALLOCATION, f"peak allocation {peak / 1e6:.0f} MB"
    # sides within limits, but 1 G pixels in a 8 kB file
    big = _fits_header_only(tmp_path / "big.fits", [16_000, 16_000, 4])
    err, peak = _peak_while(load_image, big, size=8)
    assert isinstance(err, DataError) and "big.fits" in str(err) and "limit" in str(err)
    assert peak < SMALL_ALLOCATION, f"peak allocation {peak / 1e6:.0f} MB"
    # within the pixel limit but more than the file holds: truncated, rejected before reading
    short = _fits_header_only(tmp_path / "short.fits", [4000, 4000])
    err, peak = _peak_while(load_image, short, size=8)
    assert isinstance(err, DataError) and "short.fits: FITS header claims 64000000 bytes" in str(err)
    assert peak < SMALL_ALLOCATION, f"peak allocation {peak / 1e6:.0f} MB"
    # a galpipe cutout whose last band claims 100000 x 100000
    good = _cutout(tmp_path / "good.fits")
    with fits.open(good) as hdul:
        headers = [h.header.copy() for h in hdul]
    headers[-1]["NAXIS1"] = headers[-1]["NAXIS2"] = 100_000
    blob = b"".join(h.tostring().encode("ascii") for h in headers[:1])
    with fits.open(good) as hdul:
        for h in hdul[1:-1]:
            pixels = np.ascontiguousarray(h.data, ">f4").tobytes()
            blob += h.header.tostring().encode("ascii") + pixels.ljust(-(-len(pixels) // 2880) * 2880, b"\0")
    blob += headers[-1].tostring().encode("ascii") + b"\0" * 2880
    lying = tmp_path / "lying.fits"
    lying.write_bytes(blob)
    err, peak = _peak_while(read_cutout, lying)
    assert isinstance(err, DataError), err
    assert "lying.fits: band i claims size 100000x100000; expected 1..4096 pixels per side" in str(err)
    assert peak < SMALL_ALLOCATION, f"peak allocation {peak / 1e6:.0f} MB"


def test_decompression_bomb_png_is_rejected(tmp_path: Path) -> None:
    bomb = _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    assert bomb.stat().st_size < 200
    err, peak = _peak_while(load_image, bomb, size=8)
    assert isinstance(err, DataError), err
    assert "bomb.png: rejected as a decompression bomb" in str(err)
    assert peak < SMALL_ALLOCATION
    # above galpipe's own limit (64 Mpixel) but below Pillow's: still rejected before decoding
    big = _png_header_only(tmp_path / "big.png", 9000, 9000)
    err, peak = _peak_while(load_image, big, size=8)
    assert isinstance(err, DataError) and "big.png: 9000x9000 pixels exceeds the limit" in str(err)
    assert peak < SMALL_ALLOCATION


# --------------------------------------------------------------------------- labels CSV and catalogues
def test_labels_csv_with_missing_columns(tmp_path: Path) -> None:
    params = _labels(tmp_path, "objid,class,image\n1,spiral,a.png\n")
    with pytest.raises(DataError, match=r"labels\.csv: missing column\(s\) label \(images\.label_column\); "
                                        r"columns present: \['objid', 'class', 'image'\]"):
        read_labels(params)


def test_labels_csv_with_duplicate_ids(tmp_path: Path) -> None:
    params = _labels(tmp_path, "objid,label,image\n1,spiral,a.png\n2,spiral,b.png\n1,elliptical,c.png\n")
    with pytest.raises(DataError, match=r"labels\.csv: duplicate id\(s\) \[1\]; id 1 is on rows \[2, 4\]"):
        read_labels(params)


def test_labels_csv_with_unknown_labels(tmp_path: Path) -> None:
    params = _labels(tmp_path, "objid,label,image\n1,S,a.png\n2,E,b.png\n3,merger,c.png\n",
                     label_map={"S": "spiral", "E": "elliptical"})
    with pytest.raises(DataError, match=r"labels\.csv: row 4: label 'merger' is not in images\.label_map"):
        read_labels(params)


@pytest.mark.parametrize("text_id", ["12.5", "abc", "NGC1000", "1e5", "١٢", "0x1F", "99999999999999999999"])
def test_labels_csv_with_text_ids(tmp_path: Path, text_id: str) -> None:
    from galpipe.sources.images import text_objid

    params = _labels(tmp_path, f"objid,label,image\n1,spiral,a.png\n{text_id},spiral,b.png\n")
    df = read_labels(params)
    row = df[df["name"] == text_id]
    assert len(row) == 1 and int(row["objid"].iloc[0]) == text_objid(text_id) < 0
    assert df.loc[df["name"] == "1", "objid"].tolist() == [1]


@pytest.mark.parametrize(("bad_id", "match"), [("", "is empty"), ("a\x07b", "control characters"),
                                               ("x" * 200, "more than 128 characters")])
def test_labels_csv_with_unusable_ids(tmp_path: Path, bad_id: str, match: str) -> None:
    params = _labels(tmp_path, f"objid,label,image\n1,spiral,a.png\n{bad_id},spiral,b.png\n")
    with pytest.raises(DataError, match=rf"labels\.csv: row 3: .*{match}"):
        read_labels(params)


def test_empty_catalogue(tmp_path: Path) -> None:
    empty = pd.DataFrame({"objid": pd.Series([], dtype="int64"), "ra": [], "dec": [], "label": []})
    with pytest.raises(DataError, match=r"catalogue: the catalogue is empty \(no galaxies selected\)"):
        check_catalogue(empty)
    path = tmp_path / "cat.parquet"
    empty.to_parquet(path)
    with pytest.raises(DataError, match=rf"catalogue {re.escape(str(path))}: the catalogue is empty"):
        read_catalogue(path)
    # every label mapped away: nothing left to build a catalogue from
    params = _labels(tmp_path, "objid,label,image\n1,DK,a.png\n", label_map={"DK": None})
    with pytest.raises(DataError, match=r"labels\.csv: no labelled rows left after applying images\.label_map"):
        read_labels(params)


# --------------------------------------------------------------------------- config and architectures
@pytest.mark.parametrize(("config", "message"), [
    ({"cutout_size": "64"}, r"config key 'cutout_size': '64' is not of type 'integer'"),
    ({"seed": 1.5}, r"config key 'seed': 1\.5 is not of type 'integer'"),
    ({"shards": True}, r"config key 'shards': True is not of type 'integer'"),
    ({"bands": "gri"}, r"config key 'bands': 'gri' is not of type 'array'"),
    ({"trainig": {"epochs": 3}}, r"config: unknown key\(s\) 'trainig'; allowed keys: .*training"),
    ({"training": {"lrr": 0.1}}, r"config key 'training': unknown key\(s\) 'lrr'; allowed keys: .*\blr\b"),
    ({"split": {"fractions": {"train": 1.5}}}, r"config key 'split\.fractions\.train': 1\.5 is greater than"),
    ({"split": {"fractions": {"test": 0}}}, r"config key 'split\.fractions\.test': 0 is less than or equal to"),
    ({"split": {"fractions": {"train": 0.5, "validation": 0.1, "test": 0.1}}},
     r"config key 'split\.fractions': train \+ validation \+ test = 0\.7, expected 1"),
    ({"max_reject_fraction": -0.1}, r"config key 'max_reject_fraction': -0\.1 is less than the minimum of 0"),
    ({"normalise": {"bad_pixel_value": float("nan")}}, r"config key 'normalise\.bad_pixel_value': nan is not a finite"),
    ({"normalise": {"softening": float("inf")}}, r"config key 'normalise\.softening': inf is not a finite number"),
    ({"simulated": {"class_fractions": {1: 2.0}}}, r"config key 'simulated\.class_fractions': key 1 \(int\) is not a"),
    ({"seed": 10**30}, r"config key 'seed': an integer of 100 bits is out of range"),
    ({"simulated": {"mag_r_range": [18.0, 14.0]}}, r"config key 'simulated\.mag_r_range': \[18\.0, 14\.0\] must be"),
    ({"source": "images"}, r"config key 'images\.directory': required when source is 'images'"),
])
def test_config_errors_name_the_key(config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_architecture_that_does_not_fit_fails_before_training_naming_the_layer() -> None:
    cfg = validate_config({"cutout_size": 32})
    bad_kernel = {"broken": {"architecture": [{"type": "conv2d", "filters": 4, "kernel_size": 64,
                                               "padding": "valid"}, "flatten"]}}
    with pytest.raises(ModelError, match=r"config key 'experiments\.broken\.architecture': layer 0 \(conv2d\): "
                                         r".*kernel 64x64 .* does not fit input 32x32"):
        check_architectures(cfg, bad_kernel)
    dense_on_image = {"flat": {"architecture": ["relu", {"type": "dense", "units": 4}]}}
    with pytest.raises(ModelError, match=r"experiments\.flat\.architecture': layer 1 \(dense\): .*insert a "
                                         r"'flatten' or 'global_avg_pool'"):
        check_architectures(cfg, dense_on_image)
    unknown = {"typo": {"architecture": [{"type": "conv3d"}]}}
    with pytest.raises(ModelError, match=r"unknown layer type 'conv3d' \(did you mean 'conv2d'\?\); valid types"):
        check_architectures(cfg, unknown)


# --------------------------------------------------------------------------- quarantine vs failure
def _image_folder(root: Path) -> tuple[Path, dict[int, str]]:
    """Ten labelled JPEGs: a corrupt one (objid 3) and an empty one (objid 8) among them.

    (A NaN-only FITS among JPEGs is refused as a mixed folder before any job; see test_refuse.py.)
    """
    img = root / "images"
    img.mkdir(parents=True)
    rows, bad = [], {}
    for i in range(10):
        name = f"g{i}.jpg"
        if i == 3:
            (img / name).write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
            bad[i] = name
        elif i == 8:
            (img / name).write_bytes(b"")
            bad[i] = name
        else:
            _rgb(img / name, seed=i)
        rows.append(f"{i},{'spiral' if i % 2 else 'elliptical'},{name}")
    (root / "labels.csv").write_text("objid,label,image\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return img, bad


def _images_config(root: Path, img: Path, max_reject: float) -> dict:
    return validate_config({
        "source": "images", "cutout_size": 16, "shards": 1, "max_reject_fraction": max_reject,
        "images": {"directory": str(img), "labels_csv": str(root / "labels.csv")},
    })


def test_bad_galaxies_are_quarantined_or_fail_the_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.chdir(tmp_path)
    img, _ = _image_folder(tmp_path)
    strict = _images_config(tmp_path, img, 0.0)
    run_catalogue(stage_params(strict, "catalogue"), "cat.parquet", ["shard.parquet"])
    with pytest.raises(DataError) as info:
        run_cutouts(stage_params(strict, "cutouts"), "shard.parquet", "manifest.parquet", cutout_cache_dir(strict))
    msg = str(info.value)
    assert "cutouts of shard shard.parquet: 2 of 10 galaxies failed, more than max_reject_fraction=0.0" in msg
    assert "first: objid 3: image" in msg and "g3.jpg: corrupt or truncated image" in msg
    assert not Path("manifest.parquet").exists()

    lenient = _images_config(tmp_path, img, 0.35)
    manifest = run_cutouts(stage_params(lenient, "cutouts"), "shard.parquet", "manifest.parquet",
                             cutout_cache_dir(lenient))
    failed = manifest[manifest["status"] != "ok"].set_index("objid")
    assert sorted(failed.index) == [3, 8]
    assert "g3.jpg: corrupt or truncated image" in failed.loc[3, "reason"]
    assert "g8.jpg: file is empty (0 bytes)" in failed.loc[8, "reason"]
    # a cutout that went bad after the cutouts stage is quarantined by normalise
    good_path = manifest.set_index("objid").loc[5, "path"]
    Path(good_path).write_bytes(Path(good_path).read_bytes()[:3000])
    stats = run_normalise(stage_params(lenient, "normalise"), "manifest.parquet", "shard.parquet",
                            "normalised.parquet", "rejects.parquet")
    assert stats["n"] == 7 and stats["n_rejected"] == 3
    rejects = pd.read_parquet("rejects.parquet").set_index("objid")
    assert rejects.loc[3, "stage"] == "cutouts" and "g3.jpg" in rejects.loc[3, "reason"]
    assert rejects.loc[8, "stage"] == "cutouts" and "g8.jpg" in rejects.loc[8, "reason"]
    assert rejects.loc[5, "stage"] == "normalise" and "5.fits" in rejects.loc[5, "reason"]
    assert sorted(pd.read_parquet("normalised.parquet")["objid"]) == [0, 1, 2, 4, 6, 7, 9]
    # the same shard under a stricter threshold fails, naming the first rejected galaxy
    tighter = _images_config(tmp_path, img, 0.25)
    with pytest.raises(DataError, match=r"3 of 10 galaxies rejected, more than max_reject_fraction=0\.25; "
                                        r"first: objid 3 \(cutouts\)"):
        run_normalise(stage_params(tighter, "normalise"), "manifest.parquet", "shard.parquet",
                        "normalised2.parquet", "rejects2.parquet")
    assert not Path("normalised2.parquet").exists() and not Path("rejects2.parquet").exists()


@pytest.mark.slow
def test_workflow_with_a_corrupt_jpeg_fails_then_quarantines(tmp_path: Path) -> None:
    img, _ = _image_folder(tmp_path / "data")
    base = {**ROBUST_TINY, "source": "images", "cutout_size": 16, "shards": 1,
            "images": {"directory": str(img), "labels_csv": str(tmp_path / "data" / "labels.csv")}}
    base.pop("simulated")
    targets = ["results/normalised/0000.parquet", "results/normalised/0000.rejects.parquet"]
    wd = tmp_path / "wd"
    write_config(wd, {**base, "max_reject_fraction": 0.0})
    run = run_workflow(wd, *targets)
    assert run.returncode != 0
    assert re.search(r"galpipe error in rule cutouts: cutouts of shard .*0000\.parquet: 2 of 10 galaxies failed, "
                     r"more than max_reject_fraction=0\.0; first: objid 3: image .*g3\.jpg: corrupt or truncated",
                     run.text), run.text[-4000:]
    assert (wd / "results/catalogue/catalogue.parquet").is_file()  # finished results are kept
    assert not (wd / "results/cutouts/0000.parquet").exists()
    write_config(wd, {**base, "max_reject_fraction": 0.25})
    check_ok(run_workflow(wd, *targets), "rerun with max_reject_fraction 0.25")
    rejects = pd.read_parquet(wd / "results/normalised/0000.rejects.parquet").set_index("objid")
    assert sorted(rejects.index) == [3, 8]
    assert "g3.jpg: corrupt or truncated image" in rejects.loc[3, "reason"]
    assert len(pd.read_parquet(wd / "results/normalised/0000.parquet")) == 8
    assert not [p for p in wd.rglob("*.tmp")]
