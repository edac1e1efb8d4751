"""galpipe's SQL and its parsing, checked against the real services' own formats.

* the DR17 schema: every ``alias.column`` of every query galpipe builds exists in the
  column lists derived from sciserver/sqlloader (``galpipe/testing/dr17_columns.json``);
* SkyServer's answers: the "Skyserver Error" HTML page, ``spExecuteSQL``'s
  ``error_message`` table, empty and one-line bodies, HTTP errors;
* astroquery's recorded real SkyServer answers (``astroquery/sdss/tests/data/*.txt``,
  read from the installed astroquery package, which ships them, or a local mirror; nothing is copied here)
  replayed through galpipe's parser.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from galpipe.errors import SourceError
from galpipe.sources import sdss
from galpipe.sources.download import RetryableError
from galpipe.testing import dr17_columns
from galpipe.testing.fakeserver import HAPROXY_503, format_csv, skyserver_error_page

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "galpipe" / "testing" / "dr17_columns.json"
SQLLOADER = Path("/work/.mirror/sciserver+sqlloader/repo")
ASTROQUERY = Path("/work/.mirror/astropy+astroquery/repo")


@pytest.fixture(scope="module")
def fixture() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(FIXTURE.read_text())
    return data


# --------------------------------------------------------------------------- the DR17 column fixture
def test_fixture_names_its_source_and_matches_the_stand_ins_copy(fixture: dict[str, Any]) -> None:
    src = fixture["source"]
    assert src["repository"] == "https://github.com/sciserver/sqlloader"
    assert re.fullmatch(r"[0-9a-f]{40}", src["commit"]) and src["generator"] == "scripts/dr17_columns.py"
    assert {t["file"] for t in fixture["tables"].values()} <= set(src["files"])
    assert dr17_columns.SOURCE["commit"] == src["commit"]
    assert {k: tuple(v["columns"]) for k, v in fixture["tables"].items() if "columns" in v} == {
        k: v for k, v in dr17_columns.TABLES.items() if k not in dr17_columns.VIEWS}
    assert dr17_columns.OBJECTS == {o.lower() for o in fixture["objects"]}
    # the views are SELECT * of their tables (Views.sql), and say so
    assert fixture["tables"]["PhotoObj"]["view_of"] == "PhotoObjAll"
    assert fixture["tables"]["SpecObj"]["view_of"] == "SpecObjAll"
    assert dr17_columns.TABLES["PhotoObj"] == dr17_columns.TABLES["PhotoObjAll"]
    # what the issue measured: 232 zoo2MainSpecz columns (10 id/meta + 37 answers x 6), no gz2class;
    # zooSpec has a DR8 objid named objid, no dr8objid
    zoo2 = [c.lower() for c in fixture["tables"]["zoo2MainSpecz"]["columns"]]
    assert len(zoo2) == 232 and "gz2class" not in zoo2 and sum(c.endswith("_flag") for c in zoo2) == 37
    assert {"specobjid", "dr8objid", "dr7objid"} <= set(zoo2)
    zoo1 = [c.lower() for c in fixture["tables"]["zooSpec"]["columns"]]
    assert "dr8objid" not in zoo1 and {"specobjid", "objid", "dr7objid"} <= set(zoo1)


@pytest.mark.skipif(not SQLLOADER.is_dir(), reason="no local mirror of sciserver/sqlloader to regenerate from")
def test_fixture_is_what_the_generator_derives_from_sqlloader(fixture: dict[str, Any]) -> None:
    spec = importlib.util.spec_from_file_location("dr17_columns_script", REPO / "scripts" / "dr17_columns.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    commit = fixture["source"]["commit"]
    have = subprocess.run(["git", "-C", str(SQLLOADER), "cat-file", "-e", f"{commit}^{{commit}}"],
                          capture_output=True).returncode == 0
    if not have:
        pytest.skip(f"the mirror lacks commit {commit}")
    assert script.build(SQLLOADER, commit) == fixture


def _configs() -> list[dict[str, Any]]:
    wrap = {"ra_min": 350.0, "ra_max": 10.0, "dec_min": -2.0, "dec_max": 3.0}
    every_fraction = {f"c_{c}": {c: {"min": 0.2, "max": 0.9}} for c in sdss.GZ1_FRACTION_COLUMNS}
    return [
        {"labels": {"scheme": "gz1_flags"}},
        {"labels": {"scheme": "gz1_flags"}, "selection": wrap},
        {"labels": {"scheme": "gz1_fractions", "fractions": every_fraction}},
        {"labels": {"scheme": "gz2"}, "selection": {"ra_min": 10.0, "ra_max": 20.0}},
        {"labels": {"scheme": "spec_class"}, "selection": wrap},
    ]


_TABLE = re.compile(r"(?:FROM|JOIN)\s+(\w+)\s+AS\s+(\w+)", re.I)
_REF = re.compile(r"\b([A-Za-z_]\w*)\.([A-Za-z_]\w*)\b")


@pytest.mark.parametrize("params", _configs(), ids=lambda p: p["labels"]["scheme"])
def test_every_column_of_every_query_is_in_dr17(params: dict[str, Any], fixture: dict[str, Any]) -> None:
    tables = {name.lower(): {c.lower() for c in cols} for name, cols in dr17_columns.TABLES.items()}
    objects = {o.lower() for o in fixture["objects"]}
    checked = 0
    for label in sdss.label_classes(params):
        for after in (0, 1237657070092878038):  # the first page and a keyset page
            sql = sdss.build_page_sql(params, label, top=50, after_objid=after)
            aliases = {alias.lower(): name.lower() for name, alias in _TABLE.findall(sql)}
            assert aliases and set(aliases.values()) <= objects, sql
            refs = _REF.findall(re.sub(r"\d+\.\d+", "", sql))  # numbers are not alias.column
            assert refs
            for alias, column in refs:
                assert alias.lower() in aliases, f"{alias}.{column}: alias not in FROM: {sql}"
                table = aliases[alias.lower()]
                assert column.lower() in tables[table], f"{alias}.{column}: no column {column!r} in DR17 {table}"
                checked += 1
            # nothing joined that the statement does not read from
            used = {a.lower() for a, _ in refs}
            assert used == set(aliases), f"unneeded join in {sql}"
    assert checked > 20


def test_only_spec_class_joins_specobj() -> None:
    for scheme in ("gz1_flags", "gz1_fractions", "gz2"):
        for sql in sdss.build_queries({"labels": {"scheme": scheme}}).values():
            assert "SpecObj" not in sql and "z.specobjid" in sql
    for sql in sdss.build_queries({"labels": {"scheme": "spec_class"}}).values():
        assert "JOIN SpecObj AS s ON s.bestobjid = p.objid" in sql


# --------------------------------------------------------------------------- SkyServer's answers
def _answer(body: str | bytes, status: int = 200, retry_after: str | None = None) -> Any:
    text = body.decode() if isinstance(body, bytes) else body
    return sdss.SqlAnswer(status, retry_after, text)


def _parse(body: str | bytes, status: int = 200, *, junk: int = 0, retry_after: str | None = None) -> Any:
    return sdss.parse_sql_response(_answer(body, status, retry_after), dr=17, sql="SELECT TOP 1 p.objid ...",
                                   junk=sdss._JunkBudget(junk), rate_limit_wait_s=7.0)


#: x_results.aspx's error page as a DR17 user received it (astropy/astroquery issue #2706, the body
#: astroquery turned into a one-column table): the structure, with an empty message.
REAL_ERROR_PAGE_2706 = (
    "<html><head>\n<title>Skyserver Error</title>\n</head><body bgcolor=white>\n"
    "<h2>An error occured</h2><H3 BGCOLOR=pink><font color=red><br></font></H3></BODY></HTML>"
)


def test_the_sql_server_message_is_read_from_the_error_page() -> None:
    page = skyserver_error_page("Invalid column name 'gz2class'.\nInvalid column name 'x<y'.")
    assert page.decode().splitlines()[:3] == REAL_ERROR_PAGE_2706.splitlines()[:3]
    assert sdss.skyserver_error_message(page.decode()) == "Invalid column name 'gz2class'. Invalid column name 'x<y'."
    assert sdss.skyserver_error_message(REAL_ERROR_PAGE_2706) == ""
    assert sdss.skyserver_error_message("#Table1\nobjid\n1\n") is None
    assert sdss.skyserver_error_message("<html><head><title>SQL Search</title></head></html>") is None
    with pytest.raises(sdss.SqlRejected, match=r"DR17 SQL error: Invalid column name 'gz2class'\.") as err:
        _parse(page, junk=5)
    assert err.value.server_message.startswith("Invalid column name 'gz2class'.")
    with pytest.raises(sdss.SqlRejected, match="gives no message"):
        _parse(REAL_ERROR_PAGE_2706)


def test_transient_sql_server_errors_are_retried() -> None:
    for message in ("Execution Timeout Expired.  The timeout period elapsed prior to completion of the "
                    "operation or the server is not responding.",
                    "Transaction (Process ID 57) was deadlocked on lock resources with another process and "
                    "has been chosen as the deadlock victim. Rerun the transaction."):
        with pytest.raises(RetryableError, match="transient"):
            _parse(skyserver_error_page(message))


def test_spexecutesql_rejections() -> None:
    sql = "select top 600000 p.objid, p.ra from PhotoObj AS p "
    limit = format_csv(["error_message"], [["error: limit is  top 500000 " + sql]]).decode()
    assert limit.splitlines()[1:] == ["error_message", f'"error: limit is  top 500000 {sql}"']  # quoted: a comma
    assert sdss.error_message_rows(limit) == ["error: limit is  top 500000 " + sql.strip()]
    with pytest.raises(sdss.SqlRejected, match=r"spExecuteSQL\).*page_size.*: error: limit is\s+top 500000"):
        _parse(limit, junk=5)
    rate = format_csv(["error_message"], [["ERROR: Maximum 60 queries allowed per minute. Rejected query: " + sql]])
    with pytest.raises(RetryableError, match="rate limit") as err:
        _parse(rate)
    assert err.value.retry_after == 7.0
    assert sdss.error_message_rows("#Table1\nobjid,error_message\n1,x\n") is None


@pytest.mark.parametrize("body", ["", "\n", "#Table1", "objid", "   #Table1\n  "])
def test_empty_and_one_line_bodies_are_junk_not_tracebacks(body: str) -> None:
    with pytest.raises(RetryableError, match=r"empty|one-line"):
        _parse(body, junk=1)
    with pytest.raises(SourceError, match=r"DR17 answered HTTP 200 with (an empty body|a single line)"):
        _parse(body, junk=0)


def test_one_line_body_never_opens_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # astropy reads a str without a newline as a file name: with astroquery's own parser a body
    # "objid" would read a file called objid from the working directory
    monkeypatch.chdir(tmp_path)
    (tmp_path / "objid").write_text("objid\n1\n2\n")
    with pytest.raises(SourceError, match="single line"):
        _parse("objid")


def test_http_errors() -> None:
    with pytest.raises(RetryableError, match="HTTP 503") as err:
        _parse(HAPROXY_503, 503)
    assert err.value.retry_after is None  # HAProxy sends none
    with pytest.raises(RetryableError) as err:
        _parse("busy", 429, retry_after="12")
    assert err.value.retry_after == 12.0
    with pytest.raises(SourceError, match=r"HTTP 400.*ErrorMessage"):
        _parse('{"ErrorCode":400,"ErrorType":"BadRequest","ErrorMessage":"bad"}', 400)
    with pytest.raises(RetryableError, match="HTML page"):
        _parse("<!DOCTYPE html>\n<html><head><title>SQL Search - SkyserverSDSS</title></head></html>", junk=1)


# --------------------------------------------------------------------------- astroquery's recorded answers
def _recorded(name: str) -> str:
    """One of astroquery's recorded SkyServer answers: from the installed package (astroquery ships
    its test data), else from a local mirror of astropy/astroquery."""
    from importlib import resources

    try:
        return resources.files("astroquery.sdss.tests").joinpath("data", name).read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    if not ASTROQUERY.is_dir():
        pytest.skip(f"astroquery/sdss/tests/data/{name}: not in the installed astroquery and no local mirror")
    proc = subprocess.run(["git", "-C", str(ASTROQUERY), "show", f"HEAD:astroquery/sdss/tests/data/{name}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"astroquery/sdss/tests/data/{name} is not in the mirror")
    return proc.stdout


@pytest.mark.parametrize("name", ["xid_sp.txt", "xid_im.txt"])
def test_astroquerys_recorded_answers_parse_with_exact_ids(name: str) -> None:
    from astroquery.sdss import SDSS

    text = _recorded(name)
    lines = text.splitlines()
    assert lines[0] == "#Table1"
    header = lines[1].split(",")
    table = sdss.read_skyserver_csv(text)
    assert table is not None and table.colnames == header and len(table) == len(lines) - 2
    frame = sdss._table_to_frame(table, dr=17, expected=header, junk=sdss._JunkBudget(0))
    truth = [dict(zip(header, line.split(","), strict=True)) for line in lines[2:]]
    objid = frame["objid"].astype(np.int64)
    assert objid.tolist() == [int(r["objid"]) for r in truth]
    for col in ("run", "rerun", "camcol", "field"):
        assert frame[col].dtype.kind == "i" and frame[col].tolist() == [int(r[col]) for r in truth]
    np.testing.assert_array_equal(frame["ra"].to_numpy(), [float(r["ra"]) for r in truth])
    if "specobjid" in header:
        assert frame["specobjid"].dtype == np.uint64
        assert frame["specobjid"].tolist() == [int(r["specobjid"]) for r in truth]
    # the same table as astroquery's own parser makes of it
    class Response:
        pass

    response = Response()
    response.text = text  # type: ignore[attr-defined]
    theirs = SDSS._parse_result(response)
    assert theirs.colnames == table.colnames
    for col in table.colnames:
        assert list(theirs[col]) == list(table[col]), col


def test_dr17_spectrum_ids_above_int64_survive() -> None:
    text = _recorded("xid_sp.txt")
    head, row = text.splitlines()[1:3]
    big = (10000 << 50) | (123 << 38) | (8000 << 24) | (26 << 10)  # a BOSS plate: above 2**63
    assert big > 2**63
    fields = row.split(",")
    fields[head.split(",").index("specobjid")] = str(big)
    table = sdss.read_skyserver_csv("#Table1\n" + head + "\n" + row + "\n" + ",".join(fields) + "\n")
    frame = sdss._table_to_frame(table, dr=17, expected=["objid", "specobjid"], junk=sdss._JunkBudget(0))
    assert frame["specobjid"].dtype == np.uint64 and int(frame["specobjid"].iloc[1]) == big
    assert frame["objid"].astype(np.int64).iloc[0] == int(row.split(",")[head.split(",").index("objid")])
