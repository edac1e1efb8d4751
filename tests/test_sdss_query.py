"""SDSS SQL builders (pure) and the astroquery catalogue client against the stand-in server."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pandas as pd
import pytest
import yaml

from galpipe.config import build_section, load_settings
from galpipe.errors import ConfigError, SourceError
from galpipe.sources import sdss
from galpipe.sources.base import Source
from galpipe.sources.sdss import (
    OUTPUT_COLUMNS,
    SdssSource,
    build_class_where,
    build_page_sql,
    build_queries,
    build_selection_where,
    query_catalogue,
    sql_float,
)
from galpipe.testing.fakeserver import FakeSkyServer, FaultSpec, sql_table

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "sdss.schema.yaml"
INJECTION = "1; DROP TABLE PhotoObj --"


def _with(params: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(params)
    node = out
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


# --------------------------------------------------------------------------- schema
def test_schema_is_valid_and_matches_defaults() -> None:
    schema = yaml.safe_load(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    validator.validate({})
    defaults = build_section("sdss").to_dict()  # what the pipeline gets: the schema's defaults, filled in
    validator.validate(defaults)

    def defaults_of(node: dict[str, Any]) -> Any:
        if node.get("type") == "object" and "properties" in node:
            return {k: defaults_of(v) for k, v in node["properties"].items()}
        return node["default"]

    def described(node: dict[str, Any], path: str) -> None:
        for key, sub in node.get("properties", {}).items():
            assert "description" in sub and "default" in sub, f"{path}.{key}"
            if sub.get("type") == "object":
                assert sub.get("additionalProperties") is False or key == "fractions", key
            described(sub, f"{path}.{key}")

    described(schema, "sdss")
    assert defaults_of(schema) == defaults
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({"selection": {"ra_min": "0"}})
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({"labels": {"scheme": "gz3"}})
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({"unknown": 1})


# --------------------------------------------------------------------------- builders
@pytest.mark.parametrize(
    ("scheme", "label", "table", "condition"),
    [
        ("gz1_flags", "spiral", "FROM zooSpec AS z JOIN PhotoObj AS p ON p.objid = z.objid WHERE",
         "z.spiral = 1 AND z.uncertain = 0"),
        ("gz1_flags", "elliptical", "FROM zooSpec AS z JOIN PhotoObj AS p ON p.objid = z.objid WHERE",
         "z.elliptical = 1 AND z.uncertain = 0"),
        ("gz1_fractions", "elliptical", "FROM zooSpec AS z", "z.p_el_debiased >= 0.80000000"),
        ("gz1_fractions", "spiral", "FROM zooSpec AS z", "z.p_cs_debiased >= 0.80000000"),
        ("gz2", "elliptical", "FROM zoo2MainSpecz AS z JOIN PhotoObj AS p ON p.objid = z.dr8objid WHERE",
         "WHERE z.t01_smooth_or_features_a01_smooth_flag = 1 AND p.petroMag_r"),
        ("gz2", "spiral", "FROM zoo2MainSpecz AS z JOIN PhotoObj AS p ON p.objid = z.dr8objid WHERE",
         "WHERE z.t01_smooth_or_features_a02_features_or_disk_flag = 1 AND z.t04_spiral_a08_spiral_flag = 1 AND"),
        ("spec_class", "galaxy", "FROM PhotoObj AS p JOIN SpecObj", "s.class = 'GALAXY'"),
        ("spec_class", "qso", "FROM PhotoObj AS p JOIN SpecObj", "s.class = 'QSO'"),
    ],
)
def test_page_sql_per_scheme(scheme: str, label: str, table: str, condition: str) -> None:
    params = {"labels": {"scheme": scheme}}
    sql = build_page_sql(params, label, top=7, after_objid=1237661381693210628)
    assert sql.startswith("SELECT TOP 7 p.objid, p.ra, p.dec, p.run, p.rerun, p.camcol, p.field")
    assert table in sql
    assert condition in sql
    assert "p.objid > 1237661381693210628 ORDER BY p.objid" in sql
    assert "p.petroMag_r BETWEEN 10.00000000 AND 17.77000000" in sql
    assert "--" not in sql and ";" not in sql
    # default sky box (whole sky) adds no RA/Dec condition
    assert "p.ra " not in sql and "p.dec " not in sql
    # only spec_class needs SpecObj (the label schemes take specobjid from their own table)
    assert ("SpecObj" in sql) == (scheme == "spec_class")


def test_fraction_thresholds_min_and_max() -> None:
    params = {
        "labels": {
            "scheme": "gz1_fractions",
            "fractions": {"merger": {"p_mg": 0.4}, "edge_on": {"p_edge": {"min": 0.6, "max": 0.95}}},
        }
    }
    assert sdss.label_classes(params) == ["merger", "edge_on"]
    assert build_class_where(params, "merger") == ["z.p_mg >= 0.40000000"]
    assert build_class_where(params, "edge_on") == [
        "z.p_edge >= 0.60000000",
        "z.p_edge <= 0.95000000",
    ]


def _selection(**values: Any) -> Any:
    return build_section("sdss", {"selection": values}).selection


def test_selection_ranges_and_ra_wrap() -> None:
    where = build_selection_where(_selection(ra_min=350, ra_max=10.5, dec_min=-1.25, dec_max=2))
    assert where[0] == "(p.ra >= 350.00000000 OR p.ra <= 10.50000000)"
    assert where[1] == "p.dec BETWEEN -1.25000000 AND 2.00000000"
    assert build_selection_where(_selection(ra_min=10, ra_max=20))[0] == "p.ra BETWEEN 10.00000000 AND 20.00000000"
    with pytest.raises(ConfigError, match=r"config key 'sdss\.selection\.dec_min': 5\.0 is larger"):
        _selection(dec_min=5.0, dec_max=1.0)


def test_numbers_are_formatted_not_pasted() -> None:
    assert sql_float(1e-12) == "0.00000000"
    assert sql_float(-0.0) == "0.00000000"
    assert sql_float(np.float32(17.5)) == "17.50000000"
    assert sql_float(3) == "3.00000000"
    for bad in (float("nan"), float("inf"), 1e20, "1.0", True):
        with pytest.raises(ConfigError):
            sql_float(bad)  # type: ignore[arg-type]
    sql = build_page_sql({"selection": {"petro_mag_r_max": 1.7e1}}, "spiral", top=3)
    assert "17.00000000" in sql and "e+" not in sql.lower()


NUMERIC_KEYS = [
    "data_release",
    "selection.ra_min",
    "selection.ra_max",
    "selection.dec_min",
    "selection.dec_max",
    "selection.petro_mag_r_min",
    "selection.petro_mag_r_max",
    "selection.petro_r90_r_min",
    "selection.petro_r90_r_max",
    "selection.n_per_class",
    "query.page_size",
]


@pytest.mark.parametrize("key", NUMERIC_KEYS)
@pytest.mark.parametrize("value", [INJECTION, "17", True, None, float("nan")])
def test_strings_where_numbers_expected_raise_naming_the_key(key: str, value: Any) -> None:
    params = _with({}, key, value)
    with pytest.raises(ConfigError, match=re.escape(f"sdss.{key}")):
        build_queries(params)


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        ("labels.scheme", "gz1_flags' OR 1=1", "sdss.labels.scheme"),
        ("labels.classes", ["spiral'; DROP TABLE x"], "sdss.labels.classes"),
        ("labels.classes", "spiral", "sdss.labels.classes"),
        ("selection.ra_min", 400.0, "sdss.selection.ra_min"),
        ("selection.n_per_class", 2.5, "sdss.selection.n_per_class"),
    ],
)
def test_bad_enumerations_and_ranges(path: str, value: Any, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        build_queries(_with({}, path, value))


def test_fraction_injection_is_rejected() -> None:
    base = {"labels": {"scheme": "gz1_fractions"}}
    for fractions, key in [
        ({"spiral": {"p_cs) OR (1=1": 0.5}}, "sdss.labels.fractions.spiral"),
        ({"spiral": {"p_cs": INJECTION}}, "sdss.labels.fractions.spiral.p_cs"),
        ({"spiral": {"p_cs": {"min": "0.5"}}}, "sdss.labels.fractions.spiral.p_cs.min"),
        ({"spiral": {"p_cs": {"min": 0.9, "max": 0.1}}}, "sdss.labels.fractions.spiral.p_cs"),
        ({"Spiral'--": {"p_cs": 0.5}}, "sdss.labels.fractions"),
        ({"spiral": {"p_cs": 1.5}}, "sdss.labels.fractions.spiral.p_cs"),
    ]:
        params = _with(base, "labels.fractions", fractions)
        with pytest.raises(ConfigError, match=re.escape(key)):
            build_queries(params)


def test_builder_arguments_are_typed() -> None:
    with pytest.raises(ConfigError, match="after_objid"):
        build_page_sql({}, "spiral", top=5, after_objid="0 OR 1=1")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="top"):
        build_page_sql({}, "spiral", top="5")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not a selected class"):
        build_page_sql({}, "qso", top=5)
    # bands and seed are checked with the whole config, before any query
    with pytest.raises(ConfigError, match=r"config key 'bands"):
        load_settings({"source": "sdss", "bands": ["g", "x"]})
    with pytest.raises(ConfigError, match=r"config key 'seed'"):
        load_settings({"source": "sdss", "seed": "0"})


# --------------------------------------------------------------------------- cross-field checks
@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"sdss": {"selection": {"dec_min": 5.0, "dec_max": 1.0}}}, "sdss.selection.dec_min"),
        ({"sdss": {"selection": {"petro_mag_r_min": 18.0, "petro_mag_r_max": 17.0}}},
         "sdss.selection.petro_mag_r_min"),
        ({"sdss": {"selection": {"petro_r90_r_min": 9.0, "petro_r90_r_max": 3.0}}}, "sdss.selection.petro_r90_r_min"),
        ({"sdss": {"labels": {"classes": ["galaxy"]}}}, "sdss.labels.classes"),
        ({"sdss": {"labels": {"scheme": "spec_class", "classes": ["spiral"]}}}, "sdss.labels.classes"),
        ({"sdss": {"labels": {"scheme": "gz1_fractions", "classes": ["merger"]}}}, "sdss.labels.classes"),
        ({"sdss": {"labels": {"classes": ["spiral", "spiral"]}}}, "sdss.labels.classes"),
        ({"sdss": {"labels": {"scheme": "gz1_fractions", "fractions": {"edge": {"p_edge": {"min": 0.9, "max": 0.2}}}}}},
         "sdss.labels.fractions.edge.p_edge"),
        ({"sdss": {"labels": {"scheme": "gz1_fractions", "fractions": {"any": {"p_edge": {"min": 0.0, "max": 1.0}}}}}},
         "sdss.labels.fractions.any"),
        ({"sdss": {"labels": {"scheme": "gz1_fractions", "fractions": {}}}}, "sdss.labels.fractions"),
        ({"source": "sdss", "bands": ["g", "r", "i"], "sdss": {"cutouts": {"provider": "skyserver-jpeg"}}}, "bands"),
        ({"source": "sdss", "bands": ["red", "green", "blue"]}, "bands"),
        ({"source": "sdss", "bands": ["g", "red"]}, "bands"),
    ],
)
def test_cross_field_checks_fail_at_validation_naming_the_key(config: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"config key '{key}")):
        load_settings(config)


def test_consistent_sdss_configs_pass() -> None:
    load_settings({"source": "sdss", "bands": ["red", "green", "blue"],
                   "sdss": {"cutouts": {"provider": "skyserver-jpeg"}}})
    load_settings({"source": "sdss", "bands": ["u", "z"],
                   "sdss": {"labels": {"scheme": "spec_class", "classes": ["qso", "star"]}}})
    cfg = load_settings({"sdss": {"labels": {"scheme": "gz1_fractions",
                                             "fractions": {"edge": {"p_edge": {"max": 0.4}}}}}})
    assert sdss.label_classes(cfg.sdss) == ["edge"]
    # an sdss section is checked even while another source is configured (like the schema does)
    with pytest.raises(ConfigError, match=r"sdss\.selection\.dec_min"):
        load_settings({"source": "simulated", "sdss": {"selection": {"dec_min": 5.0, "dec_max": 1.0}}})


def test_sdss_source_implements_the_interface(tmp_path: Path) -> None:
    cfg = load_settings({"source": "sdss", "seed": 4, "bands": ["r"], "cutout_size": 32})
    src = SdssSource(cfg, frame_cache_dir=tmp_path)
    assert isinstance(src, Source) and src.name == "sdss"
    assert src.bands == ("r",) and src.crop_fraction == 1.0 and src.input_files() == []
    assert src.params() == {"source": "sdss", "seed": 4, "sdss": cfg.sdss.to_dict(), "bands": ["r"],
                            "cutout_size": 32}
    jpeg = SdssSource(load_settings({"source": "sdss", "bands": ["red", "green", "blue"],
                                     "sdss": {"cutouts": {"provider": "skyserver-jpeg"}}}))
    assert jpeg.bands == ("red", "green", "blue")


# --------------------------------------------------------------------------- against the stand-in
def _truth(srv: FakeSkyServer, scheme: str, label: str, n: int) -> list[int]:
    t = sql_table(srv.table)
    sel = (t["petroMag_r"] >= 10.0) & (t["petroMag_r"] <= 17.77)
    if scheme == "gz1_flags":
        sel &= t["in_zoo"] & (t[label] == 1) & (t["uncertain"] == 0)
    elif scheme == "spec_class":
        sel &= t["class"] == label.upper()
    elif scheme == "gz2":
        sel &= t["in_zoo"]
        for flag in sdss.GZ2_CLASS_FLAGS[label]:
            sel &= t[flag] == 1
    return sorted(int(o) for o in t.loc[sel, "objid"])[:n]


@pytest.fixture(scope="module")
def server() -> FakeSkyServer:
    # many fast queries from one client: spExecuteSQL's 60-a-minute throttle is tested on its own
    with FakeSkyServer(n_galaxies=60, seed=5, frame_shape=(96, 128), sql_max_queries=None) as srv:
        yield srv


@pytest.mark.parametrize("scheme", ["gz1_flags", "gz2", "spec_class"])
def test_paging_merges_and_matches_truth(server: FakeSkyServer, scheme: str) -> None:
    server.clear_log()
    params = server.params(
        labels={"scheme": scheme}, selection={"n_per_class": 9}, query={"page_size": 2}
    )
    cat, prov = query_catalogue(params, seed=3, bands=["g", "r", "i"])
    assert list(cat.columns[: len(OUTPUT_COLUMNS)]) == list(OUTPUT_COLUMNS)
    assert cat["objid"].dtype == np.int64 and cat["specobjid"].dtype == np.uint64
    assert cat["objid"].is_unique
    for label in sdss.label_classes(params):
        got = cat.loc[cat["label"] == label, "objid"].tolist()
        assert got == _truth(server, scheme, label, 9), label
        assert prov["counts"][label] == len(got)
    # tiny pages: several keyset queries per class, each bound by the previous page
    bounds = [int(m) for s in prov["sql"] for m in re.findall(r"p\.objid > (\d+)", s)]
    assert len(prov["sql"]) >= 2 * len(prov["classes"]) and bounds.count(0) == len(prov["classes"])
    assert prov["n_queries"] == len(server.log) == len(prov["sql"])
    truth = server.table.set_index("objid")
    np.testing.assert_allclose(cat["ra"], truth.loc[cat["objid"], "ra"])
    assert (cat["run"].to_numpy() == truth.loc[cat["objid"], "run"].to_numpy()).all()
    for key in ("sql", "data_release", "queried_at_utc", "skyserver_url", "astroquery_version"):
        assert prov[key], key
    assert prov["data_release"] == 17 and prov["skyserver_url"] == server.skyserver_url
    # every request went to the DR17 SQL endpoint exactly as astroquery builds it
    assert {e["path"] for e in server.log} == {"/dr17/en/tools/search/x_results.aspx"}


def test_gz1_keeps_galaxies_whose_zoo_spectrum_is_not_science_primary(server: FakeSkyServer) -> None:
    """Issue item 9: the old inner join to SpecObj on specobjid dropped them."""
    t = sql_table(server.table)
    moved = t[t["in_zoo"] & (t["zoo_specobjid"] != t["specobjid"])]
    params = server.params(labels={"scheme": "gz1_flags"}, selection={"n_per_class": 60}, query={"page_size": 50})
    cat, _ = query_catalogue(params, seed=0, bands=["r"])
    for label in ("spiral", "elliptical"):
        assert cat.loc[cat["label"] == label, "objid"].tolist() == _truth(server, "gz1_flags", label, 60)
    kept = cat[cat["objid"].isin(moved["objid"])]
    assert len(kept) >= 1  # galaxies the SpecObj join lost
    # specobjid is zooSpec's own (the spectrum Galaxy Zoo classified)
    truth = t.set_index("objid")
    assert (kept["specobjid"].to_numpy() == truth.loc[kept["objid"], "zoo_specobjid"].to_numpy()).all()


def test_top_above_the_row_cap_fails_at_once_naming_page_size() -> None:
    with FakeSkyServer(n_galaxies=20, seed=2, frame_shape=(96, 128), row_limit=3) as srv:
        params = srv.params(labels={"scheme": "spec_class", "classes": ["galaxy"]},
                            selection={"n_per_class": 12}, query={"page_size": 10})
        with pytest.raises(sdss.SqlRejected, match=r"row cap is 3: set sdss\.query\.page_size.*limit is\s+top 3"):
            query_catalogue(params, seed=0, bands=["r"])
        assert len(srv.log) == 1  # a rejection is not retried
        params["query"]["page_size"] = 3  # within the cap: pages of 3 until 12
        cat, prov = query_catalogue(params, seed=0, bands=["r"])
    assert cat["objid"].tolist() == _truth(srv, "spec_class", "galaxy", 12) and len(prov["sql"]) >= 4


def test_sql_server_error_message_is_reported_and_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue item 2: the message of SkyServer's error page reaches the user, after one request."""
    bad = (*sdss.LABEL_COLUMNS["gz2"], ("z.gz2class", "gz2class"))  # what galpipe used to select
    monkeypatch.setitem(sdss.LABEL_COLUMNS, "gz2", bad)
    with FakeSkyServer(n_galaxies=20, seed=1, frame_shape=(96, 128)) as srv:
        params = srv.params(labels={"scheme": "gz2"}, query={"max_retries": 4, "max_junk_retries": 2})
        with pytest.raises(SourceError, match=r"DR17 SQL error: Invalid column name 'gz2class'\.; query: SELECT"):
            query_catalogue(params, seed=0, bands=["r"])
        assert len(srv.log) == 1 and srv.log[0]["status"] == 200


def test_rate_limit_rejection_is_waited_out_and_retried() -> None:
    """Issue item 3: spExecuteSQL's "Maximum N queries allowed per minute" is temporary."""
    with FakeSkyServer(n_galaxies=40, seed=2, frame_shape=(96, 128), sql_max_queries=2, sql_window_s=0.6) as srv:
        params = srv.params(labels={"scheme": "spec_class", "classes": ["galaxy"]},
                            selection={"n_per_class": 8}, query={"page_size": 1, "max_retries": 3})
        assert params["query"]["rate_limit_wait_s"] == 0.6
        cat, prov = query_catalogue(params, seed=0, bands=["r"])
        log = srv.log
    assert cat["objid"].tolist() == _truth(srv, "spec_class", "galaxy", 8)
    assert prov["n_queries"] == len(log) > len(prov["sql"])  # some were rejected, then sent again
    # the throttle's rule held: never more than 3 accepted in a window (2 + the one that passes)
    times = np.sort([e["t"] for e in log])
    assert times[-1] - times[0] >= 0.6 * (len(prov["sql"]) // 3 - 1)
    with FakeSkyServer(n_galaxies=40, seed=2, frame_shape=(96, 128), sql_max_queries=1, sql_window_s=30.0) as srv:
        params = srv.params(labels={"scheme": "spec_class", "classes": ["galaxy"]},
                            selection={"n_per_class": 8},
                            query={"page_size": 1, "max_retries": 1, "rate_limit_wait_s": 0.05})
        with pytest.raises(SourceError, match=r"failed after 2 attempt.*rate limit: ERROR: Maximum 1 queries"):
            query_catalogue(params, seed=0, bands=["r"])


def test_duplicates_across_pages_and_ambiguous_objects_dropped(server: FakeSkyServer) -> None:
    # thresholds loose enough that some objects qualify for both classes
    params = server.params(
        labels={"scheme": "gz1_fractions",
                "fractions": {"round": {"p_el": 0.05}, "disc": {"p_cs": 0.05}}},
        selection={"n_per_class": 60}, query={"page_size": 4},
    )
    cat, prov = query_catalogue(params, seed=0, bands=["r"])
    t = server.table[server.table["in_zoo"]]
    both = set(t.loc[(t["p_el"] >= 0.05) & (t["p_cs"] >= 0.05), "objid"].astype(int))
    assert both and prov["n_ambiguous_dropped"] == len(both)
    assert not both & set(cat["objid"].astype(int))
    assert cat["objid"].is_unique


def test_queries_survive_injected_faults(server: FakeSkyServer) -> None:
    params = server.params(labels={"scheme": "spec_class"}, selection={"n_per_class": 6},
                           query={"page_size": 2})
    clean, _ = query_catalogue(params, seed=0, bands=["r"])
    with FakeSkyServer(n_galaxies=60, seed=5, frame_shape=(96, 128), sql_max_queries=None,
                       faults=FaultSpec(rate=0.35, seed=11, slow_s=0.6, retry_after_s=0.05,
                                        max_per_path=2)) as srv:
        params = srv.params(labels={"scheme": "spec_class"}, selection={"n_per_class": 6},
                            query={"page_size": 2, "timeout_s": 0.3, "max_retries": 6})
        faulty, prov = query_catalogue(params, seed=0, bands=["r"])
        faults = {e["fault"] for e in srv.log} - {None}
    assert len(faults) >= 3, faults
    pd.testing.assert_frame_equal(clean, faulty)
    assert prov["n_queries"] > len(prov["sql"])


def test_empty_result_is_a_source_error(server: FakeSkyServer) -> None:
    params = server.params(selection={"ra_min": 10.0, "ra_max": 11.0})
    with pytest.raises(SourceError, match=r"DR17.*no rows for class 'spiral'"):
        query_catalogue(params, seed=0, bands=["r"])


def test_html_page_with_status_200_is_a_source_error() -> None:
    faults = FaultSpec(rate=1.0, kinds=("html200",), max_per_path=None, endpoints=("sql",))
    with FakeSkyServer(n_galaxies=20, seed=1, faults=faults) as srv:
        params = srv.params(query={"max_junk_retries": 1})
        with pytest.raises(SourceError, match=r"DR17.*(HTML|not a CSV).*") as err:
            query_catalogue(params, seed=0, bands=["r"])
        assert len(srv.log) == 2  # first try + one junk retry, then a clear error
    assert "DOCTYPE" in str(err.value) or "html" in str(err.value).lower()


def test_persistent_server_errors_give_up_with_source_error() -> None:
    # on the SQL endpoint a server-side failure is a transient SQL Server error on the error page
    faults = FaultSpec(rate=1.0, kinds=("500",), max_per_path=None, endpoints=("sql",))
    with FakeSkyServer(n_galaxies=20, seed=1, frame_shape=(96, 128), faults=faults) as srv:
        params = srv.params(query={"max_retries": 2, "max_junk_retries": 0})
        with pytest.raises(SourceError, match=r"DR17 SQL query: failed after 3 attempt.*Execution Timeout Expired"):
            query_catalogue(params, seed=0, bands=["r"])
        assert len(srv.log) == 3
    # the front end's 503 (HAProxy, no Retry-After) is retried with backoff too
    faults = FaultSpec(rate=1.0, kinds=("503",), max_per_path=1, endpoints=("sql",))
    with FakeSkyServer(n_galaxies=20, seed=1, frame_shape=(96, 128), faults=faults) as srv:
        _cat, prov = query_catalogue(srv.params(selection={"n_per_class": 2}), seed=0, bands=["r"])
        assert {e["status"] for e in srv.log} == {200, 503} and prov["n_queries"] == 2 * len(prov["sql"])


class _Scripted:
    """A tiny HTTP server answering the SQL endpoint with scripted bodies, then a valid table."""

    def __init__(self, bodies: list[bytes], table: bytes) -> None:
        import http.server
        import threading

        self.bodies, self.table, self.requests = list(bodies), table, 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                owner.requests += 1
                body = owner.bodies.pop(0) if owner.bodies else owner.table
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("body", [b"", b"#Table1", b"objid"])
def test_empty_or_one_line_answer_is_junk_not_a_traceback(server: FakeSkyServer, body: bytes) -> None:
    """Issue item 4: through astroquery 0.4.11's parser these raise IsADirectoryError/FileNotFoundError."""
    from galpipe.testing.fakeserver import execute_sql, format_csv

    params = server.params(labels={"scheme": "spec_class", "classes": ["galaxy"]}, selection={"n_per_class": 2},
                           query={"max_junk_retries": 1})
    table = format_csv(*execute_sql(sql_table(server.table), sdss.build_page_sql(params, "galaxy", top=2)))
    fake = _Scripted([body], table)
    try:
        params["skyserver_url"] = fake.url
        cat, _ = query_catalogue(params, seed=0, bands=["r"])
        assert fake.requests == 2 and cat["objid"].tolist() == _truth(server, "spec_class", "galaxy", 2)
        fake.bodies, fake.requests = [body], 0
        params["query"]["max_junk_retries"] = 0
        with pytest.raises(SourceError, match=r"DR17 answered HTTP 200 with (an empty body|a single line)"):
            query_catalogue(params, seed=0, bands=["r"])
        assert fake.requests == 1
    finally:
        fake.close()
