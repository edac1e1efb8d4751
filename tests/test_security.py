"""Security: typed SQL, no raw ids or labels in paths, no pickle, a loopback-only stand-in server."""

from __future__ import annotations

import ast
import math
import re
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from galpipe.catalogue import check_catalogue
from galpipe.config import build_section, validate_config
from galpipe.errors import ConfigError, DataError, GalpipeError
from galpipe.io.atomic import safe_filename
from galpipe.io.cutout_fits import cutout_filename
from galpipe.sources import sdss
from galpipe.sources.images import read_labels

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "galpipe"

#: Hostile values for every SQL-bound setting: injections, comments, quotes, non-ASCII digits,
#: numbers as text, non-finite and out-of-range numbers, wrong types.
INJECTIONS: list[Any] = [
    "1; DROP TABLE PhotoObj--", "0 OR 1=1", "'", "1' OR '1'='1", "10 /* comment */", "-- comment",
    "١٢", "１２", "12", "1e400", "nan", 1e400, -1e400, float("nan"), np.float64("nan"), 10**400, -(10**400),
    True, None, b"12", [12], {"value": 12}, "spiral' OR 1=1 --",
]


def _ids(values: list[Any]) -> list[str]:
    return [repr(v)[:24] for v in values]


# --------------------------------------------------------------------------- SQL from typed values only
def _selection(key: str, value: Any) -> dict:
    return {"selection": {key: value}}


SQL_FIELDS: list[tuple[str, Any]] = [
    *((f"sdss.selection.{k}", lambda v, k=k: _selection(k, v))
      for k in sorted(build_section("sdss").selection.to_dict())),
    ("sdss.data_release", lambda v: {"data_release": v}),
    ("sdss.query.page_size", lambda v: {"query": {"page_size": v}}),
    ("sdss.labels.scheme", lambda v: {"labels": {"scheme": v}}),
    ("sdss.labels.classes", lambda v: {"labels": {"classes": [v]}}),
    ("sdss.labels.fractions.spiral.p_cs", lambda v: {"labels": {"scheme": "gz1_fractions",
                                                                "fractions": {"spiral": {"p_cs": v}}}}),
    ("sdss.labels.fractions.spiral.p_cs.min", lambda v: {"labels": {"scheme": "gz1_fractions",
                                                                    "fractions": {"spiral": {"p_cs": {"min": v}}}}}),
    ("sdss.labels.fractions", lambda v: {"labels": {"scheme": "gz1_fractions",
                                                    "fractions": {_key(v): {"p_cs": 0.8}}}}),
    ("sdss.labels.fractions.spiral", lambda v: {"labels": {"scheme": "gz1_fractions",
                                                           "fractions": {"spiral": {_key(v): 0.8}}}}),
]


def _key(value: Any) -> Any:
    """Use ``value`` as a mapping key (unhashable ones as their repr)."""
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


@pytest.mark.parametrize(("field", "make"), SQL_FIELDS, ids=[f for f, _ in SQL_FIELDS])
def test_every_sql_field_rejects_injection_and_untyped_values(field: str, make: Any) -> None:
    for value in INJECTIONS:
        if field == "sdss.labels.fractions" and isinstance(value, str) and re.fullmatch(r"[a-z]\w*", value):
            continue  # e.g. "nan": a fine class name (class names only name classes, never reach SQL)
        params = make(value)
        # the schema (and cross_field_checks) reject it when the section is built, before any SQL
        with pytest.raises(ConfigError) as info:
            build_section("sdss", params)
        assert str(info.value).startswith(f"config key '{field}"), (value, str(info.value))
        with pytest.raises(ConfigError) as info:
            sdss.build_queries(params)  # a mapping handed to a builder goes through the same schema
        assert str(info.value).startswith(f"config key '{field}"), (value, str(info.value))


def test_keyset_bounds_and_page_sizes_are_typed() -> None:
    for value in INJECTIONS:
        with pytest.raises(ConfigError, match=r"^top: expected an integer"):
            sdss.build_page_sql({}, "spiral", top=value)
        with pytest.raises(ConfigError, match=r"^after_objid: expected an integer"):
            sdss.build_page_sql({}, "spiral", top=10, after_objid=value)
    with pytest.raises(ConfigError, match="not a selected class"):
        sdss.build_page_sql({}, "spiral' OR 1=1 --", top=10)


def test_the_pipeline_config_rejects_injection_before_any_sql() -> None:
    for cfg, key in [({"selection": {"ra_min": "0 OR 1=1"}}, "sdss.selection.ra_min"),
                     ({"data_release": "17; DROP TABLE PhotoObj--"}, "sdss.data_release"),
                     ({"labels": {"scheme": "gz2' --"}}, "sdss.labels.scheme"),
                     ({"selection": {"dec_max": float("nan")}}, "sdss.selection.dec_max")]:
        with pytest.raises(ConfigError, match=re.escape(f"config key '{key}'")):
            validate_config({"source": "sdss", "sdss": cfg})


def test_valid_values_become_fixed_point_literals() -> None:
    params = {"selection": {"ra_min": 350, "ra_max": 10.5, "dec_min": -1e-9, "dec_max": 2.0,
                            "petro_mag_r_max": np.float32(17.77)},
              "labels": {"scheme": "gz1_fractions", "fractions": {"spiral": {"p_cs": 0.8}}}}
    sql = sdss.build_queries(params)["spiral"]
    assert "(p.ra >= 350.00000000 OR p.ra <= 10.50000000)" in sql
    assert "p.dec BETWEEN 0.00000000 AND 2.00000000" in sql
    assert "z.p_cs >= 0.80000000" in sql
    assert ";" not in sql and "--" not in sql and "/*" not in sql and "e-" not in sql.lower()
    assert re.fullmatch(r"[A-Za-z0-9_ .,=<>()'*%-]+", sql), sql


# --------------------------------------------------------------------------- ids and labels never raw in paths
HOSTILE_NAMES = ["../evil", "../../etc/passwd", "/abs/path", "a/b", "a\\b", "a\x00b", "..", ".", ".hidden",
                 "x" * 300, "", " ", "spiral\n", "ok..", "C:evil"]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=_ids(HOSTILE_NAMES))
def test_safe_filename_rejects_path_tricks(name: str) -> None:
    with pytest.raises(DataError, match="is not usable as a file name"):
        safe_filename(name, what="label")


def test_object_ids_must_be_integers_to_become_file_names() -> None:
    assert cutout_filename(np.int64(1237648720693755918)) == "1237648720693755918.fits"
    for bad in ["../x", "5", 5.0, True, None, "1/2", b"5"]:
        with pytest.raises(DataError, match="is not an integer"):
            cutout_filename(bad)


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("column", ["objid", "label", "image"])
def test_hostile_catalogue_values_fail_and_write_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         column: str) -> None:
    from galpipe.stages import catalogue as catalogue_stage

    images = tmp_path / "sandbox" / "images"
    images.mkdir(parents=True)
    (tmp_path / "outside.png").write_bytes(b"")
    (images / "ok.png").write_bytes(b"")
    (images / "link.png").symlink_to(tmp_path / "outside.png")
    values = {"objid": ["7\x00", "1" * 5000, "a\x1b[2Jb"],  # other text ids are hashed, see below
              "label": [v for v in HOSTILE_NAMES if v and v == v.strip()],  # the reader strips cells
              "image": ["../outside.png", "/etc/passwd", "link.png", "a\x00.png", "sub/../../outside.png"]}[column]
    monkeypatch.chdir(tmp_path / "sandbox")
    for value in values:
        row = {"objid": "1", "label": "spiral", "image": "ok.png", column: value}
        text = "objid,label,image\n2,elliptical,ok.png\n" + ",".join(_csv(row[c]) for c in ("objid", "label", "image"))
        (tmp_path / "labels.csv").write_text(text + "\n", encoding="utf-8")
        params = {"directory": str(images), "labels_csv": str(tmp_path / "labels.csv"), "id_column": "objid",
                  "label_column": "label", "path_column": "image", "label_map": {}}
        before = _snapshot(tmp_path)
        with pytest.raises(DataError, match=r"labels\.csv: row 3: ") as info:
            catalogue_stage.run({"source": "images", "seed": 0, "images": params}, "out/catalogue.parquet",
                                ["out/shard.parquet"])
        expected = {"objid": "control characters or more than", "label": "is not usable as a file name",
                    "image": "must be relative to|escapes"}[column]
        assert re.search(expected, str(info.value)), str(info.value)
        assert _snapshot(tmp_path) == before, f"{value!r}: something was written"


def test_path_like_text_ids_never_become_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A text id is hashed to an integer objid: the cutout file is named by that integer."""
    from galpipe.sources.images import read_labels, text_objid

    images = tmp_path / "images"
    images.mkdir()
    rows = ["../../etc", "1/2", "-", "1e3", "NGC 1000"]
    for i in range(len(rows)):
        (images / f"{i}.png").write_bytes(b"")
    text = "objid,label,image\n" + "".join(f"{_csv(r)},spiral,{i}.png\n" for i, r in enumerate(rows))
    (tmp_path / "labels.csv").write_text(text)
    df = read_labels({"directory": str(images), "labels_csv": str(tmp_path / "labels.csv"),
                      "id_column": "objid", "label_column": "label", "path_column": "image", "label_map": {}})
    assert sorted(df["name"]) == sorted(rows)
    for name, objid in zip(df["name"], df["objid"], strict=True):
        assert objid == text_objid(name)
        assert cutout_filename(objid) == f"{objid}.fits" and "/" not in cutout_filename(objid)


def _csv(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def test_label_map_targets_and_catalogue_labels_are_checked(tmp_path: Path) -> None:
    df = pd.DataFrame({"objid": [1, 2], "ra": [0.0, 1.0], "dec": [0.0, 1.0], "label": ["spiral", "../../x"]})
    with pytest.raises(DataError, match=r"catalogue: objid 2: label '\.\./\.\./x' is not usable as a file name"):
        check_catalogue(df)
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "labels.csv").write_text("objid,label,image\n1,S,a.png\n", encoding="utf-8")
    params = {"directory": str(tmp_path), "labels_csv": str(tmp_path / "labels.csv"), "id_column": "objid",
              "label_column": "label", "path_column": "image", "label_map": {"S": "../spiral"}}
    # a label_map target is a config value: the schema rejects it, also when read_labels gets a mapping
    with pytest.raises(ConfigError, match=r"config key 'images\.label_map\.S'"):
        read_labels(params)
    with pytest.raises(ConfigError, match=r"config key 'images\.label_map\.S'"):
        validate_config({"images": {"label_map": {"S": "../spiral"}}})
    # a raw label (no label_map) is data: read_labels rejects it naming the row
    (tmp_path / "labels.csv").write_text("objid,label,image\n1,../spiral,a.png\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 2: label '\.\./spiral' is not usable as a file name"):
        read_labels({**params, "label_map": {}})


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/b", "a\x00b", "x" * 200, ".hidden", "", "a\n"],
                         ids=["dotdot", "abs", "slash", "nul", "long", "hidden", "empty", "newline"])
def test_experiment_names_never_become_paths(tmp_path: Path, name: str) -> None:
    from galpipe.stages.train import run as train_experiment

    with pytest.raises(ConfigError, match=r"config key 'experiments'"):
        validate_config({"experiments": {name: {"architecture": "small_cnn"}}})
    root = tmp_path / "run"
    root.mkdir()
    with pytest.raises(DataError, match=r"experiment name .* is not usable as a file name"):
        train_experiment({"architecture": []}, root / "train.parquet", root / "validation.parquet",
                         root / "models" / "m" / "model.json", name=name, checkpoint_root=root / "checkpoints")
    assert list(tmp_path.rglob("*")) == [root], "nothing may be written for a rejected name"


# --------------------------------------------------------------------------- no pickle anywhere
BANNED = {
    "pickle-like module": r"^\s*(?:import|from)\s+(?:pickle|cPickle|_pickle|dill|cloudpickle|shelve|marshal|joblib)\b",
    "pickle call": r"\bpickle\.\w+\(",
    "allow_pickle=True": r"allow_pickle\s*=\s*True",
    "eval(": r"(?<![\w.])eval\(",
    "exec(": r"(?<![\w.])exec\(",
    # yaml.load only with an explicit safe loader on the same line
    "unsafe yaml": r"\byaml\.(?:unsafe_load|full_load|load_all)\(|\byaml\.load\((?![^)]*Loader=yaml\.C?SafeLoader\))",
    "pandas pickle": r"\b(?:read_pickle|to_pickle)\(",
    "torch.load": r"\btorch\.load\(",
}


@pytest.mark.parametrize(("line", "banned"), [
    ("yaml.load(text)", True),
    ("yaml.load(text, Loader=yaml.Loader)", True),
    ("yaml.load(text, Loader=yaml.FullLoader)", True),
    ("yaml.full_load(text)", True),
    ("yaml.load(text, Loader=yaml.CSafeLoader)", False),
    ("yaml.load(text, Loader=yaml.SafeLoader)", False),
    ("yaml.safe_load(text)", False),
])
def test_the_unsafe_yaml_pattern(line: str, banned: bool) -> None:
    assert bool(re.search(BANNED["unsafe yaml"], line)) is banned


def test_no_pickle_eval_or_unsafe_loaders_in_the_package() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = []
    for f in files:
        for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
            for what, pattern in BANNED.items():
                if re.search(pattern, line):
                    found.append(f"{f.relative_to(REPO)}:{lineno}: {what}: {line.strip()}")
    assert not found, "\n".join(found)


def test_every_np_load_forbids_pickle() -> None:
    calls = []
    for f in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in ("np", "numpy")):
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False
                calls.append((f"{f.relative_to(REPO)}:{node.lineno}", ok))
    assert calls, "expected np.load calls (model weights, checkpoints)"
    assert all(ok for _, ok in calls), [where for where, ok in calls if not ok]


class _Payload:
    """Unpickling this creates ``marker`` -- proof that pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_weights_with_an_object_array_are_rejected_without_unpickling(tmp_path: Path) -> None:
    from galpipe.nn.model import build_model
    from galpipe.nn.persist import load_model, save_model

    model = build_model([{"type": "dense", "units": 3}], (4,), seed=0)
    out = save_model(model, tmp_path / "model")
    marker = tmp_path / "pwned"
    weights = out / "weights.npz"
    with np.load(weights, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    first = sorted(arrays)[0]
    arrays[first] = np.array([_Payload(marker)], dtype=object)
    np.savez(weights, **arrays)
    with pytest.raises(GalpipeError, match=r"weights\.npz"):
        load_model(out)
    assert not marker.exists(), "a pickled object inside weights.npz was executed"


# --------------------------------------------------------------------------- the stand-in server
def test_fake_skyserver_listens_on_loopback_only() -> None:
    from galpipe.testing.fakeserver import FakeSkyServer

    with FakeSkyServer(n_galaxies=4, seed=0, frame_shape=(64, 64)) as server:
        httpd = server._httpd
        assert httpd is not None
        host, port = httpd.socket.getsockname()[:2]
        assert host == "127.0.0.1" and port > 0
        assert httpd.socket.family == socket.AF_INET
        assert server.skyserver_url == f"http://127.0.0.1:{port}"
        assert not math.isnan(port)
