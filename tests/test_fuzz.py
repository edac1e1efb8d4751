"""Fuzzing: hostile bytes, tables and configs may only ever raise galpipe's own errors.

Image loaders (random bytes, mutated valid PNG/JPEG/FITS files), the labels
CSV reader, the config validator (random nested values) and the SDSS SQL
builders (random values in every field) must either succeed or raise a
:class:`~galpipe.errors.GalpipeError` subclass -- never a bare ``TypeError``,
``OverflowError``, astropy ``VerifyError`` and the like.

The examples are derandomized so CI is reproducible; ``GALPIPE_FUZZ_RANDOM=1``
explores fresh ones and ``GALPIPE_FUZZ_SCALE=10`` runs ten times as many.
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from galpipe.config import build_section, validate_config
from galpipe.errors import GalpipeError
from galpipe.io.cutout_fits import read_cutout, write_cutout
from galpipe.sources import sdss
from galpipe.sources.images import load_image, read_labels

SCALE = float(os.environ.get("GALPIPE_FUZZ_SCALE", "1"))


def fuzz_settings(n: int) -> settings:
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None,
                    derandomize=os.environ.get("GALPIPE_FUZZ_RANDOM", "") != "1",
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def only_galpipe_errors(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``func``; a GalpipeError is an accepted outcome, anything else propagates (test failure)."""
    try:
        return func(*args, **kwargs)
    except GalpipeError:
        return None


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="galpipe-fuzz-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def seeds(workdir: Path) -> dict[str, bytes]:
    """Valid files of every kind the loaders accept, to be mutated."""
    rng = np.random.default_rng(0)
    d = workdir / "seeds"
    d.mkdir()
    write_cutout(d / "layout.fits", rng.normal(size=(3, 12, 12)).astype(np.float32), bands=["g", "r", "i"],
                 objid=5, ra=1.0, dec=2.0, source="simulated")
    write_cutout(d / "dn.fits", (rng.random((3, 10, 10)) * 255).astype(np.uint8), bands=["red", "green", "blue"],
                 objid=6, ra=np.nan, dec=np.nan, source="images", bunit="DN")
    fits.PrimaryHDU(rng.normal(size=(2, 12, 12)).astype(np.float32)).writeto(d / "plain.fits")
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU((rng.random((9, 9)) * 100).astype(np.int16))]).writeto(
        d / "ext.fits")
    Image.fromarray((rng.random((12, 12, 3)) * 255).astype(np.uint8)).save(d / "rgb.png")
    Image.fromarray((rng.random((12, 12, 3)) * 255).astype(np.uint8)).save(d / "rgb.jpg", quality=85)
    Image.fromarray((rng.random((12, 12)) * 255).astype(np.uint8), mode="L").save(d / "grey.png")
    Image.fromarray((rng.random((12, 12, 4)) * 255).astype(np.uint8), mode="RGBA").save(d / "rgba.png")
    Image.fromarray((rng.random((12, 12)) * 255).astype(np.uint8), mode="L").convert("P").save(d / "pal.png")
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# --------------------------------------------------------------------------- image loaders
FITS_TOKENS = [b"NAXIS1  = ", b"NAXIS   =                    3", b"BITPIX  =                  -64",
               b"= 99999999", b"=       -1", b"END     ", b"XTENSION= 'IMAGE   '", b"BANDS   = 'g,r'",
               b"NBANDS  = ", b"= 'nan'", b"OBJID   = 'x'", b"BZERO   = ", b"NaN", b"\x00\x00\x00\x00"]
IMAGE_TOKENS = [b"IHDR", b"IDAT", b"IEND", b"\xff\xd8", b"\xff\xd9", b"\xff\xc0\x00\x11\x08\xff\xff\xff\xff",
                b"\x00\x01\x86\xa0\x00\x01\x86\xa0", b"PLTE", b"tRNS", b"\xff" * 8]


@st.composite
def mutated_files(draw: st.DrawFn, seeds: dict[str, bytes]) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(seeds)))
    data = bytearray(seeds[name])
    tokens = FITS_TOKENS if name.endswith(".fits") else IMAGE_TOKENS
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "token"]))
        if op == "flip":
            data[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            data = data[:i]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[i: i + draw(st.integers(1, 80))]
        else:
            tok = draw(st.sampled_from(tokens))
            data[i: i + len(tok)] = tok
    return name, bytes(data)


def _load_all(path: Path) -> None:
    out = only_galpipe_errors(load_image, path, size=8, crop_fraction=0.8)
    if out is not None:
        data, bunit, bands = out
        assert data.shape == (len(bands), 8, 8) and isinstance(bunit, str)
    if path.suffix == ".fits":
        only_galpipe_errors(read_cutout, path)
        only_galpipe_errors(read_cutout, path, bands=["g", "r", "i"])


def test_image_loaders_on_mutated_valid_files(workdir: Path, seeds: dict[str, bytes]) -> None:
    target = workdir / "mutated"
    target.mkdir(exist_ok=True)

    @fuzz_settings(600)
    @given(mutated_files(seeds))
    def check(case: tuple[str, bytes]) -> None:
        name, data = case
        path = target / name
        path.write_bytes(data)
        _load_all(path)

    check()


def test_image_loaders_on_random_bytes(workdir: Path) -> None:
    target = workdir / "random"
    target.mkdir(exist_ok=True)
    magic = st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"SIMPLE  =                    T"])

    @fuzz_settings(300)
    @given(magic, st.binary(max_size=400), st.sampled_from([".png", ".jpg", ".jpeg", ".fits", ".fit"]))
    def check(head: bytes, body: bytes, suffix: str) -> None:
        path = target / f"random{suffix}"
        path.write_bytes(head + body)
        _load_all(path)

    check()


# --------------------------------------------------------------------------- labels CSV
CELLS = st.one_of(
    st.text(max_size=10),
    st.sampled_from(["1", "-5", " 7 ", "99999999999999999999", "١٢", "1e3", "0x10", "img.png", "../x.png",
                     "/etc/passwd", "a\x00b", "..", "spiral", "elliptical", "", '"', "a,b", "\n", "x" * 300]),
)


def test_labels_csv_reader(workdir: Path) -> None:
    d = workdir / "labels"
    d.mkdir(exist_ok=True)
    (d / "img.png").write_bytes(b"")
    label_maps = st.one_of(st.just({}), st.dictionaries(st.text(max_size=5), st.one_of(st.none(),
                           st.sampled_from(["spiral", "elliptical"])), max_size=3))

    @fuzz_settings(300)
    @given(st.lists(st.lists(CELLS, max_size=4), max_size=6), st.booleans(), label_maps, st.booleans())
    def check(rows: list[list[str]], header: bool, label_map: dict, raw: bool) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf)
        if header:
            writer.writerow(["objid", "label", "image"])
        writer.writerows(rows)
        (d / "labels.csv").write_text(buf.getvalue(), encoding="utf-8", errors="surrogatepass") if not raw else \
            (d / "labels.csv").write_bytes(buf.getvalue().encode("utf-8", "surrogatepass")[::-1])
        params = {"directory": str(d), "labels_csv": str(d / "labels.csv"), "id_column": "objid",
                  "label_column": "label", "path_column": "image", "label_map": label_map}
        out = only_galpipe_errors(read_labels, params)
        if out is not None:  # what passes is clean: int64 unique ids, safe labels, paths inside the folder
            assert out["objid"].is_unique and str(out["objid"].dtype) == "int64"
            assert all(Path(p).resolve().is_relative_to(d.resolve()) for p in out["image_path"])
            assert not any("/" in lab or lab.startswith(".") for lab in out["label"])

    check()


# --------------------------------------------------------------------------- config validator
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**80), max_value=2**80), st.floats(),
    st.text(max_size=8),
    st.sampled_from(["1; DROP TABLE PhotoObj--", "0 OR 1=1", "'", "١٢", "1e400", "nan", "simulated", "gz2"]),
)
KEYS = st.one_of(
    st.sampled_from(["source", "seed", "bands", "cutout_size", "shards", "max_reject_fraction", "simulated",
                     "images", "normalise", "split", "training", "experiments", "evaluate", "sdss", "fractions",
                     "train", "clip", "n_galaxies", "region", "ra_min", "schedule", "architecture", "type",
                     "labels", "selection", "query", "scheme", "classes", "min", "max", "label_map"]),
    st.text(max_size=5), st.integers(), st.none(), st.booleans(),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)

#: A valid config and the key paths a fuzzer overwrites (one random value at a random depth).
BASE_CONFIG = {
    "source": "simulated", "seed": 1, "cutout_size": 32, "shards": 2, "simulated": {"n_galaxies": 30},
    "split": {"fractions": {"train": 0.6, "validation": 0.2, "test": 0.2}},
    "training": {"epochs": 2, "schedule": {"type": "cosine"}},
    "experiments": {"a": {"architecture": [{"type": "conv2d", "filters": 4}, "relu", "global_avg_pool"]}},
    "sdss": {"selection": {"ra_min": 10.0}, "labels": {"scheme": "gz1_flags"}},
}
PATHS = [("source",), ("seed",), ("bands",), ("cutout_size",), ("simulated", "n_galaxies"),
         ("simulated", "class_fractions"), ("simulated", "region", "ra_min"), ("split", "fractions", "train"),
         ("split", "fractions"), ("training", "lr"), ("training", "schedule", "type"), ("normalise", "clip"),
         ("experiments", "a", "architecture"), ("experiments", "a", "training"), ("experiments",),
         ("images", "label_map"), ("sdss", "selection", "ra_min"), ("sdss", "labels"), ("sdss", "query"),
         ("evaluate", "n_bootstrap"), ("max_reject_fraction",)]


def _set(cfg: dict, path: tuple[str, ...], value: Any) -> dict:
    node = cfg
    for part in path[:-1]:
        node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
    node[path[-1]] = value
    return cfg


def test_config_validator_random_documents() -> None:
    @fuzz_settings(400)
    @given(st.dictionaries(KEYS, VALUES, max_size=6))
    def check(doc: dict) -> None:
        only_galpipe_errors(validate_config, doc)

    check()


def test_config_validator_one_bad_value_in_a_valid_config() -> None:
    import copy

    assert validate_config(BASE_CONFIG)["seed"] == 1

    @fuzz_settings(400)
    @given(st.sampled_from(PATHS), VALUES)
    def check(path: tuple[str, ...], value: Any) -> None:
        cfg = _set(copy.deepcopy(BASE_CONFIG), path, value)
        out = only_galpipe_errors(validate_config, cfg)
        if out is not None:  # whatever validates has only finite numbers and string keys
            stack = [out]
            while stack:
                node = stack.pop()
                if isinstance(node, dict):
                    assert all(isinstance(k, str) for k in node)
                    stack.extend(node.values())
                elif isinstance(node, list):
                    stack.extend(node)
                elif isinstance(node, float):
                    assert math.isfinite(node)

    check()


# --------------------------------------------------------------------------- SQL builders
THRESHOLD = st.one_of(VALUES, st.dictionaries(KEYS, VALUES, max_size=3))  # a number or {min:, max:}
CLASS_CUTS = st.one_of(VALUES, st.dictionaries(st.one_of(st.sampled_from(sdss.GZ1_FRACTION_COLUMNS), KEYS),
                                               THRESHOLD, max_size=3))
FRACTIONS = st.one_of(VALUES, st.dictionaries(st.one_of(st.sampled_from(["spiral", "elliptical", "Bad Name"]),
                                                        KEYS), CLASS_CUTS, max_size=3))
LABELS = st.fixed_dictionaries({}, optional={
    "scheme": st.one_of(VALUES, st.sampled_from(sorted(sdss.SCHEME_CLASSES))),
    "classes": st.one_of(VALUES, st.lists(st.sampled_from(["spiral", "elliptical", "galaxy", "star", "x"]))),
    "fractions": FRACTIONS,
})
SDSS_SECTION = st.fixed_dictionaries({}, optional={
    "data_release": VALUES,
    "labels": LABELS,
    "selection": st.dictionaries(st.sampled_from(sorted(build_section("sdss").selection.to_dict())), VALUES),
    "query": st.dictionaries(st.one_of(st.sampled_from(sorted(build_section("sdss").query.to_dict())), KEYS), VALUES),
})


def _assert_plain_sql(sql: str) -> None:
    assert ";" not in sql and "--" not in sql and "/*" not in sql, sql
    assert sql.isascii() and "\x00" not in sql, sql


def test_sql_builders_with_random_values_in_every_field() -> None:
    @fuzz_settings(600)
    @given(st.one_of(SDSS_SECTION, VALUES), st.sampled_from(["spiral", "elliptical", "galaxy", "qso", "x"]),
           VALUES, VALUES)
    def check(params: Any, label: str, top: Any, after: Any) -> None:
        section = only_galpipe_errors(sdss.sdss_section, params)  # the schema + cross-field checks
        queries = only_galpipe_errors(sdss.build_queries, params)
        assert (queries is None) == (section is None)
        for sql in (queries or {}).values():
            _assert_plain_sql(sql)
        for kwargs in ({"top": 10}, {"top": top, "after_objid": after}):
            sql = only_galpipe_errors(sdss.build_page_sql, section if section is not None else params, label,
                                      **kwargs)
            if sql is not None:
                _assert_plain_sql(sql)

    check()
