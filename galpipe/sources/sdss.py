"""Live SDSS catalogue: validated SQL builders and an astroquery client.

The catalogue is selected on SkyServer with astroquery's
:meth:`astroquery.sdss.SDSS.query_sql_async` (``GET
{skyserver_url}/dr{DR}/en/tools/search/x_results.aspx?cmd=...&format=csv``; the
answer is checked and parsed here, see :func:`parse_sql_response`),
one class at a time (balanced sampling, ``n_per_class`` galaxies each), and
paged with a keyset on ``objid``::

    SELECT TOP {page} ... WHERE <class> AND <selection> AND p.objid > {last}
    ORDER BY p.objid

Each page starts after the largest ``objid`` seen so far; paging stops when
``n_per_class`` rows are collected or a page comes back empty (a short page
does not stop it: SkyServer silently truncates results at its row limit).
Pages are merged and de-duplicated on ``objid``; an object that qualifies for
two classes (possible with loose ``gz1_fractions`` thresholds) is dropped from
both and counted in the provenance.  The sample is deterministic: the lowest
``objid`` values that pass the cuts (the seed is recorded, not used -- SQL
Server's ``NEWID()`` ordering would not be reproducible).

Label schemes (``sdss.labels.scheme``); every table and column named here is in
DR17's schema (``galpipe/testing/dr17_columns.json``, derived from sciserver/sqlloader):

``gz1_flags``
    Galaxy Zoo 1 ``zooSpec`` joined to ``PhotoObj`` on ``objid`` (zooSpec's DR8
    objid); ``specobjid`` is zooSpec's own.  ``spiral`` = ``z.spiral = 1``,
    ``elliptical`` = ``z.elliptical = 1``, always with ``z.uncertain = 0``
    (the debiased, 80 per cent "clean" flags of Lintott et al. 2011).  No join
    to ``SpecObj``: it would only repeat ``specobjid`` and would drop every
    galaxy whose DR7 spectrum is not DR17's science-primary one.
``gz1_fractions``
    The same tables; each class is defined by thresholds on GZ1 vote fractions,
    ``{column: minimum}`` or ``{column: {min: .., max: ..}}`` with columns from
    :data:`GZ1_FRACTION_COLUMNS`.
``gz2``
    Galaxy Zoo 2 ``zoo2MainSpecz`` joined to ``PhotoObj`` on ``dr8objid``
    (``specobjid`` is zoo2MainSpecz's own; DR17 has no ``gz2class`` column).
    The classes use the clean-sample flags of Willett et al. (2013, MNRAS 435,
    2835; "1 if galaxy is in clean sample" in the DR17 schema), see
    :data:`GZ2_CLASS_FLAGS`: ``elliptical`` = smooth
    (``t01_smooth_or_features_a01_smooth_flag = 1``); ``spiral`` = features
    or disk *and* spiral arms (``t01_smooth_or_features_a02_features_or_disk_flag
    = 1`` and ``t04_spiral_a08_spiral_flag = 1``).  Edge-on discs (whose arms
    cannot be seen), discs without arms and star/artifact votes are in neither
    class.
``spec_class``
    ``SpecObj.class`` of the best spectrum: ``galaxy``/``star``/``qso``
    (``GALAXY``/``STAR``/``QSO``), joined on ``s.bestobjid = p.objid``.

Errors, as SkyServer reports them (see :func:`parse_sql_response`): a SQL
Server error comes back as HTTP 200 with an HTML "Skyserver Error" page whose
``<font color=red>`` holds the message -- it is put into the
:class:`~galpipe.errors.SourceError` and not retried (unless it is a transient
one: a timeout, a deadlock); a rejection by ``spExecuteSQL`` comes back as a
CSV table with one ``error_message`` column -- the per-client rate limit
("Maximum 60 queries allowed per minute") is waited out
(``sdss.query.rate_limit_wait_s``) and retried within ``max_retries``, any
other rejection (TOP above the row cap, ...) fails at once with the message.
An empty or one-line body, another HTML page or a cut table is junk, retried
``max_junk_retries`` times.

Configuration: every function takes the validated, typed section
(:class:`galpipe.settings.SdssConfig`); the schema has checked each value's type
and range, and :func:`galpipe.config.cross_field_checks` the rules that involve
several keys (selection min <= max, classes of the scheme, fraction cuts, bands
of the provider), so a bad config fails before any job runs, naming the key.

Security: the SQL is assembled only from range-checked numbers (formatted with
fixed precision by :func:`sql_float`/:func:`sql_int`, never pasted), and
table/column/literal strings taken from fixed whitelists in this module.

:class:`SdssSource` is the registered source ``sdss``; its cutouts come from
:mod:`galpipe.sources.sdss_cutouts`.
"""

from __future__ import annotations

import csv
import html
import math
import random
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import numpy as np
import pandas as pd
import requests

from galpipe import __version__
from galpipe.errors import ConfigError, SourceError
from galpipe.settings import Config, SdssConfig, SdssLabels, SdssSelection
from galpipe.sources import register_source
from galpipe.sources.base import CutoutCache, NoLocalFiles, PathLike
from galpipe.sources.download import (
    RETRY_STATUSES,
    FetchError,
    RateLimiter,
    RetryableError,
    call_with_retries,
    parse_retry_after,
)

#: Label schemes and the classes each one knows.
SCHEME_CLASSES: dict[str, tuple[str, ...]] = {
    "gz1_flags": ("spiral", "elliptical"),
    "gz1_fractions": (),  # user-defined names, see sdss.labels.fractions
    "gz2": ("spiral", "elliptical"),
    "spec_class": ("galaxy", "star", "qso"),
}
#: Default classes of each scheme when ``sdss.labels.classes`` is null.
SCHEME_DEFAULT_CLASSES: dict[str, tuple[str, ...]] = {
    "gz1_flags": ("spiral", "elliptical"),
    "gz1_fractions": (),  # the keys of sdss.labels.fractions
    "gz2": ("spiral", "elliptical"),
    "spec_class": ("galaxy", "star", "qso"),
}
#: Galaxy Zoo 1 vote-fraction columns of ``zooSpec`` usable in thresholds.
GZ1_FRACTION_COLUMNS: tuple[str, ...] = (
    "p_el",
    "p_cw",
    "p_acw",
    "p_edge",
    "p_dk",
    "p_mg",
    "p_cs",
    "p_el_debiased",
    "p_cs_debiased",
)
#: ``zoo2MainSpecz`` clean-sample flags (Willett et al. 2013) that must all be 1 for each GZ2 class.
GZ2_CLASS_FLAGS: dict[str, tuple[str, ...]] = {
    "elliptical": ("t01_smooth_or_features_a01_smooth_flag",),
    "spiral": ("t01_smooth_or_features_a02_features_or_disk_flag", "t04_spiral_a08_spiral_flag"),
}
#: ``zoo2MainSpecz`` debiased vote fractions returned with the gz2 scheme.
GZ2_FRACTION_COLUMNS: tuple[str, ...] = (
    "t01_smooth_or_features_a01_smooth_debiased",
    "t01_smooth_or_features_a02_features_or_disk_debiased",
    "t04_spiral_a08_spiral_debiased",
)
#: ``SpecObj.class`` value of each spec_class label.
SPEC_CLASS_VALUE: dict[str, str] = {"galaxy": "GALAXY", "star": "STAR", "qso": "QSO"}

BANDS: tuple[str, ...] = ("u", "g", "r", "i", "z")

#: PhotoObj columns selected for every scheme (``p.`` prefix), in output order.
PHOTO_COLUMNS: tuple[str, ...] = (
    "objid",
    "ra",
    "dec",
    "run",
    "rerun",
    "camcol",
    "field",
    *(f"petroMag_{b}" for b in BANDS),
    "petroR50_r",
    "petroR90_r",
    "fracDeV_r",
    "deVAB_r",
    "expAB_r",
)
#: Label-source columns per scheme: (SQL expression, output name).
LABEL_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "gz1_flags": (
        ("z.specobjid", "specobjid"),
        ("z.nvote", "nvote"),
        *((f"z.{c}", c) for c in GZ1_FRACTION_COLUMNS),
        ("z.spiral", "spiral"),
        ("z.elliptical", "elliptical"),
        ("z.uncertain", "uncertain"),
    ),
    "gz2": (
        ("z.specobjid", "specobjid"),
        ("z.total_classifications", "total_classifications"),
        *((f"z.{c}", c) for c in GZ2_FRACTION_COLUMNS),
        *((f"z.{c}", c) for c in dict.fromkeys(f for flags in GZ2_CLASS_FLAGS.values() for f in flags)),
    ),
    "spec_class": (
        ("s.specobjid", "specobjid"),
        ("s.class", "spec_class"),
        ("s.z", "redshift"),
    ),
}
LABEL_COLUMNS["gz1_fractions"] = LABEL_COLUMNS["gz1_flags"]

_FROM: dict[str, str] = {
    "gz1_flags": "FROM zooSpec AS z JOIN PhotoObj AS p ON p.objid = z.objid",
    "gz2": "FROM zoo2MainSpecz AS z JOIN PhotoObj AS p ON p.objid = z.dr8objid",
    "spec_class": "FROM PhotoObj AS p JOIN SpecObj AS s ON s.bestobjid = p.objid",
}
_FROM["gz1_fractions"] = _FROM["gz1_flags"]

#: Output columns of :func:`query_catalogue` before the label-source columns.
OUTPUT_COLUMNS: tuple[str, ...] = (
    "objid",
    "ra",
    "dec",
    "label",
    "specobjid",
    "run",
    "rerun",
    "camcol",
    "field",
    *(f"petroMag_{b}" for b in BANDS),
    "petroR50_r",
    "petroR90_r",
    "fracDeV_r",
    "deVAB_r",
    "expAB_r",
)
_INT_COLUMNS = ("run", "rerun", "camcol", "field")
#: Integer label-source columns (besides the ``*_flag`` columns of zoo2MainSpecz).
_LABEL_INT_COLUMNS = ("nvote", "spiral", "elliptical", "uncertain", "total_classifications")
MAX_OBJID = 2**63 - 1


# --------------------------------------------------------------------------- SQL literals
def _show(value: object) -> str:
    """A short repr for messages (a huge int has no repr beyond 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 100:
        return f"<integer of {value.bit_length()} bits>"
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def check_integer(key: str, value: object, lo: int, hi: int) -> int:
    """Return the function argument ``value`` as an int in ``[lo, hi]`` (no bools, strings or floats).

    For arguments that are not config values (a page size, a keyset bound);
    config values are checked by the schema.

    Raises
    ------
    ConfigError
        The message starts with ``key``.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(
            f"{key}: expected an integer in [{lo}, {hi}], got {type(value).__name__} {_show(value)}"
        )
    if not lo <= int(value) <= hi:
        raise ConfigError(f"{key}: expected an integer in [{lo}, {hi}], got {_show(value)}")
    return int(value)


def sql_float(value: float) -> str:
    """Format a validated float for SQL: fixed point, 8 decimals, never exponent."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigError(f"internal: SQL number expected, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or abs(v) > 1e9:
        raise ConfigError(f"internal: SQL number out of range: {v!r}")
    text = f"{v:.8f}"
    return "0.00000000" if text == "-0.00000000" else text


def sql_int(value: int) -> str:
    """Format a validated integer for SQL."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"internal: SQL integer expected, got {type(value).__name__}")
    return str(int(value))


def _sql_name(name: str, allowed: Sequence[str]) -> str:
    """``name`` if it is one of the fixed identifiers ``allowed`` (defence in depth before SQL)."""
    if name not in allowed:
        raise ConfigError(f"internal: {_show(name)} is not an allowed SQL name")
    return name


def base_url(url: str) -> str:
    """A configured service URL without its trailing slash (astroquery's ``*_baseurl`` form)."""
    return url.rstrip("/")


# --------------------------------------------------------------------------- the section
def sdss_section(sdss: SdssConfig | Mapping[str, Any] | None) -> SdssConfig:
    """``sdss`` as the typed section; a plain mapping (some keys set) is completed and
    validated by the schema and :func:`galpipe.config.cross_field_checks` first.

    Raises
    ------
    ConfigError
        The mapping is not a valid ``sdss:`` section (the message names the key).
    """
    from galpipe.config import as_section

    section: SdssConfig = as_section("sdss", sdss)
    return section


# --------------------------------------------------------------------------- labels
def label_classes(sdss: SdssConfig | Mapping[str, Any]) -> list[str]:
    """The classes to select: ``sdss.labels.classes``, or the scheme's (for ``gz1_fractions``
    the keys of ``sdss.labels.fractions``) when it is null."""
    labels = sdss_section(sdss).labels
    if labels.classes is not None:
        return list(labels.classes)
    if labels.scheme == "gz1_fractions":
        return list(labels.fractions)
    return list(SCHEME_DEFAULT_CLASSES[labels.scheme])


def fraction_cuts(labels: SdssLabels) -> dict[str, dict[str, tuple[float, float]]]:
    """``sdss.labels.fractions`` as class -> vote column -> ``(min, max)``.

    A bare number is a minimum (max 1); ``{min:, max:}`` gives either or both
    (missing: 0 and 1).  The schema has checked the names and ranges, and
    :func:`galpipe.config.cross_field_checks` that min <= max and that every
    class has a real cut.
    """
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for cls, conds in labels.fractions.items():
        out[cls] = {}
        for col, spec in conds.items():
            if isinstance(spec, Mapping):
                out[cls][col] = (float(spec.get("min", 0.0)), float(spec.get("max", 1.0)))
            else:
                out[cls][col] = (float(spec), 1.0)
    return out


# --------------------------------------------------------------------------- SQL builders
def build_selection_where(selection: SdssSelection) -> list[str]:
    """SQL conditions of the sky/magnitude/size selection (``sdss.selection``).

    An RA range with ``ra_min > ra_max`` wraps through 0 (e.g. 350..10 deg).

    Parameters
    ----------
    selection : SdssSelection
        The validated section (every value a range-checked number).

    Returns
    -------
    list of str
        Conditions to AND together, e.g. ``"p.dec BETWEEN -1.00000000 AND 1.00000000"``.
    """
    s = selection
    where: list[str] = []
    if s.ra_min <= s.ra_max:
        if not (s.ra_min == 0.0 and s.ra_max == 360.0):
            where.append(f"p.ra BETWEEN {sql_float(s.ra_min)} AND {sql_float(s.ra_max)}")
    else:
        where.append(f"(p.ra >= {sql_float(s.ra_min)} OR p.ra <= {sql_float(s.ra_max)})")
    if not (s.dec_min == -90.0 and s.dec_max == 90.0):
        where.append(f"p.dec BETWEEN {sql_float(s.dec_min)} AND {sql_float(s.dec_max)}")
    where.append(f"p.petroMag_r BETWEEN {sql_float(s.petro_mag_r_min)} AND {sql_float(s.petro_mag_r_max)}")
    where.append(f"p.petroR90_r BETWEEN {sql_float(s.petro_r90_r_min)} AND {sql_float(s.petro_r90_r_max)}")
    return where


def build_class_where(sdss: SdssConfig | Mapping[str, Any], label: str) -> list[str]:
    """SQL conditions that define class ``label`` under the configured scheme.

    Raises
    ------
    ConfigError
        ``label`` is not one of :func:`label_classes`.
    """
    sdss = sdss_section(sdss)
    scheme = sdss.labels.scheme
    if label not in label_classes(sdss):
        raise ConfigError(f"sdss.labels.classes: {_show(label)} is not a selected class of scheme {scheme!r}")
    if scheme == "gz1_flags":
        return [f"z.{_sql_name(label, SCHEME_CLASSES[scheme])} = 1", "z.uncertain = 0"]
    if scheme == "gz1_fractions":
        conds: list[str] = []
        for col, (lo, hi) in sorted(fraction_cuts(sdss.labels)[label].items()):
            name = _sql_name(col, GZ1_FRACTION_COLUMNS)
            if lo > 0.0:
                conds.append(f"z.{name} >= {sql_float(lo)}")
            if hi < 1.0:
                conds.append(f"z.{name} <= {sql_float(hi)}")
        return conds
    if scheme == "gz2":
        return [f"z.{_sql_name(flag, GZ2_CLASS_FLAGS[label])} = 1" for flag in GZ2_CLASS_FLAGS[label]]
    return [f"s.class = '{SPEC_CLASS_VALUE[label]}'"]


def select_columns(scheme: str) -> list[tuple[str, str]]:
    """``(SQL expression, output name)`` pairs selected for ``scheme``."""
    return [(f"p.{c}", c) for c in PHOTO_COLUMNS] + list(LABEL_COLUMNS[scheme])


def build_page_sql(sdss: SdssConfig | Mapping[str, Any], label: str, *, top: int, after_objid: int = 0) -> str:
    """SQL of one keyset page of class ``label``.

    Parameters
    ----------
    sdss : SdssConfig or mapping
        The validated ``sdss:`` config section (a mapping goes through
        :func:`sdss_section`).
    label : str
        A class of the configured scheme.
    top : int
        Rows requested (``TOP``), 1..500000.
    after_objid : int
        Keyset bound: only ``p.objid > after_objid`` (0 for the first page).

    Returns
    -------
    str
        One SQL statement (no comments, no ``--``), ordered by ``p.objid``.

    Raises
    ------
    ConfigError
        ``top`` or ``after_objid`` is not an integer in range (the message
        starts with the argument's name), or ``label`` is not a selected class.
    """
    sdss = sdss_section(sdss)
    scheme = sdss.labels.scheme
    top = check_integer("top", top, 1, 500_000)
    after = check_integer("after_objid", after_objid, 0, MAX_OBJID)
    cols = ", ".join(
        expr if expr.split(".", 1)[1] == name else f"{expr} AS {name}" for expr, name in select_columns(scheme)
    )
    where = build_class_where(sdss, label) + build_selection_where(sdss.selection)
    where.append(f"p.objid > {sql_int(after)}")
    return f"SELECT TOP {sql_int(top)} {cols} {_FROM[scheme]} WHERE {' AND '.join(where)} ORDER BY p.objid"


def build_queries(sdss: SdssConfig | Mapping[str, Any]) -> dict[str, str]:
    """First-page SQL of every selected class (a dry run of what will be sent): class -> SQL."""
    sdss = sdss_section(sdss)
    top = min(sdss.query.page_size, sdss.selection.n_per_class)
    return {label: build_page_sql(sdss, label, top=top) for label in label_classes(sdss)}


# --------------------------------------------------------------------------- the client
def _astroquery() -> tuple[Any, Any, str]:
    import astroquery
    from astroquery.sdss import SDSS, conf

    return SDSS, conf, astroquery.__version__


def _snippet(table: Any, n: int = 200) -> str:
    try:
        text = " | ".join(str(c) for c in table.colnames[:4])
        if len(table):
            text += " || " + " ".join(str(v) for v in list(table[0])[:4])
    except Exception:  # pragma: no cover - defensive: never mask the real problem
        text = repr(table)
    return " ".join(text.split())[:n]


class _JunkBudget:
    """How many answers that are not the expected CSV one query may still retry."""

    def __init__(self, n: int) -> None:
        self.left = n

    def retry_or_fail(self, retry_reason: str, error: str, cause: BaseException | None = None) -> NoReturn:
        """Raise :class:`RetryableError` while the budget lasts, then :class:`SourceError`."""
        if self.left > 0:
            self.left -= 1
            raise RetryableError(retry_reason) from cause
        raise SourceError(error) from cause


#: SQL Server messages of a failure that may pass on a retry (timeouts, deadlocks, lost
#: connections); any other SQL error on a "Skyserver Error" page is permanent.
TRANSIENT_SQL_ERRORS = re.compile(
    r"timeout expired|deadlock|transport-level error|network-related|connection (?:was )?(?:closed|broken"
    r"|forcibly)|server is not responding|insufficient system memory|service is currently busy",
    re.IGNORECASE,
)
#: spExecuteSQL's per-client throttle message ("ERROR: Maximum 60 queries allowed per minute. Rejected
#: query: ..."; sciserver/sqlloader schema/sql/spSQLSupport.sql, procedure spExecuteSQL).
RATE_LIMIT_MESSAGE = re.compile(r"maximum\s+\d+\s+queries\s+allowed\s+per\s+minute", re.IGNORECASE)
_FONT_RED = re.compile(r"<font\s+color\s*=\s*[\"']?red[\"']?\s*>(.*?)</font\s*>", re.IGNORECASE | re.DOTALL)
_TITLE = re.compile(r"<title\s*>(.*?)</title\s*>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]*>")
#: Id columns astroquery's SDSS parser casts to uint64 (astroquery.sdss.core.SDSSClass._parse_result).
_ID_COLUMNS = ("objid", "specobjid", "objID", "specobjID", "specObjID")


class SqlRejected(SourceError):
    """SkyServer refused a statement for good (a SQL Server error or an ``spExecuteSQL`` rejection).

    Attributes
    ----------
    server_message : str
        The server's own message (SQL Server's text, or the ``error_message`` value).
    """

    def __init__(self, message: str, server_message: str) -> None:
        super().__init__(message)
        self.server_message = server_message


def _one_line(text: str, n: int = 300) -> str:
    """``text`` on one line, at most ``n`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= n else flat[: n - 3] + "..."


def skyserver_error_message(text: str) -> str | None:
    """The SQL Server message of SkyServer's HTML error page, or None if ``text`` is not one.

    ``x_results.aspx`` reports a failed statement as HTTP 200 with a page titled
    ``Skyserver Error`` whose message stands in ``<font color=red>...</font>``
    (HTML-encoded, ended by ``<br>``).  The tags are removed, entities decoded and
    whitespace collapsed; a page with the title but no red text gives ``""``.
    """
    head = text[:4096]
    title = _TITLE.search(head)
    if title is None or "skyserver error" not in title.group(1).lower():
        return None
    found = _FONT_RED.search(text)
    if found is None:
        return ""
    return " ".join(html.unescape(_TAG.sub(" ", found.group(1))).split())


def error_message_rows(text: str) -> list[str] | None:
    """The values of an ``spExecuteSQL`` rejection (a CSV table whose only column is
    ``error_message``), or None if ``text`` is another answer."""
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not lines or lines[0].strip().lower() != "error_message":
        return None
    return [" ".join(row).strip() for row in csv.reader(lines[1:]) if row]


def read_skyserver_csv(text: str) -> Any:
    """SkyServer's CSV answer (``#Table1``, a header line, rows) as an astropy table, None if it has no rows.

    The same reading as astroquery's ``SDSSClass._parse_result`` (``ascii.csv``,
    ``#`` comments, the id columns cast to uint64: DR17 spectrum ids exceed int64
    and are read as text first), except that the lines are passed as a list:
    astropy reads a *string* without a newline as a file name, so an empty or
    one-line body would open a file (``IsADirectoryError`` for ``""``,
    ``FileNotFoundError`` otherwise) instead of failing as data.

    Raises
    ------
    ValueError
        The text is not a CSV table (astropy's reader found no consistent table).
    """
    from astropy.table import Table

    with warnings.catch_warnings():
        # ids above 2**63 (DR17 spectra) are read as text, then cast to uint64 below
        warnings.filterwarnings("ignore", message=r"OverflowError converting to IntType in column .*")
        table = Table.read(text.splitlines(), format="ascii.csv", comment="#")
    for name in _ID_COLUMNS:
        if name in table.colnames:
            table[name] = table[name].astype(np.uint64)
    return table if len(table) else None


@dataclass(frozen=True)
class SqlAnswer:
    """What one SQL request got: the HTTP status, the ``Retry-After`` header and the body text."""

    status: int
    retry_after: str | None
    text: str


def parse_sql_response(answer: SqlAnswer, *, dr: int, sql: str, junk: _JunkBudget,
                       rate_limit_wait_s: float) -> Any:
    """Turn one SkyServer SQL answer into an astropy table (None: no rows) or the right error.

    Parameters
    ----------
    answer : SqlAnswer
        Status, ``Retry-After`` and body text of the response.
    dr : int
        Data release (for messages).
    sql : str
        The statement sent (for messages).
    junk : _JunkBudget
        Retries left for answers that are not a CSV table.
    rate_limit_wait_s : float
        Seconds to wait after a rate-limit rejection before the retry.

    Returns
    -------
    astropy.table.Table or None

    Raises
    ------
    RetryableError
        HTTP 429/5xx (``Retry-After`` honoured), a transient SQL Server error, the
        rate-limit rejection (wait ``rate_limit_wait_s``), or junk while the budget lasts.
    SqlRejected
        A permanent SQL Server error (its message included) or another ``spExecuteSQL``
        rejection (its ``error_message``); never retried.
    SourceError
        Another HTTP error status, or junk once the budget is spent.
    """
    text = answer.text
    if answer.status >= 400:
        said = skyserver_error_message(text)
        shown = said if said else _one_line(_TAG.sub(" ", text), 160)
        if answer.status in RETRY_STATUSES:
            raise RetryableError(f"HTTP {answer.status}" + (f" ({said})" if said else ""),
                                 parse_retry_after(answer.retry_after))
        raise SourceError(f"SkyServer DR{dr} refused the query (HTTP {answer.status}: {shown!r}): {sql[:160]}...")
    message = skyserver_error_message(text)
    if message is not None:
        if TRANSIENT_SQL_ERRORS.search(message):
            raise RetryableError(f"SkyServer SQL error (transient): {_one_line(message, 160)}")
        raise SqlRejected(f"SkyServer DR{dr} SQL error: {message or '(the error page gives no message)'}; "
                          f"query: {sql[:200]}...", message)
    rejections = error_message_rows(text)
    if rejections is not None:
        reason = _one_line(" | ".join(rejections), 400) or "(empty error_message)"
        if RATE_LIMIT_MESSAGE.search(reason):
            raise RetryableError(f"SkyServer rate limit: {_one_line(reason, 80)}", rate_limit_wait_s)
        cap = re.search(r"limit is\s+top\s+(\d+)", reason, re.IGNORECASE)
        hint = f" (its row cap is {cap.group(1)}: set sdss.query.page_size to at most that)" if cap else ""
        raise SqlRejected(f"SkyServer DR{dr} rejected the query (spExecuteSQL){hint}: {reason}", reason)
    body = text.strip().lstrip("\ufeff")
    if not body or "\n" not in body:
        junk.retry_or_fail(
            f"{'empty' if not body else 'one-line'} answer {body[:60]!r}",
            f"SkyServer DR{dr} answered HTTP {answer.status} with "
            + ("an empty body" if not body else f"a single line, not a CSV table: {_one_line(body, 200)!r}"),
        )
    if body[:1] == "<":
        title = _TITLE.search(body[:4096])
        junk.retry_or_fail(
            "HTML page instead of CSV",
            f"SkyServer DR{dr} answered with an HTML page, not a CSV table"
            + (f" (title {_one_line(title.group(1), 80)!r})" if title else "")
            + f": {_one_line(_TAG.sub(' ', body), 200)!r}",
        )
    try:
        return read_skyserver_csv(text)
    except ValueError as exc:  # astropy's reader: ragged or otherwise not a table
        junk.retry_or_fail(
            f"unparsable response ({_one_line(str(exc), 80)})",
            f"SkyServer DR{dr} answered with something that is not a CSV table: "
            f"{_one_line(str(exc), 120)}; body: {_one_line(body, 160)!r}",
            exc,
        )


def _send_query(sql: str, *, dr: int, timeout_s: float, junk: _JunkBudget, rate_limit_wait_s: float) -> Any:
    """One request through astroquery's ``SDSS.query_sql_async``; the answer goes to :func:`parse_sql_response`.

    astroquery builds the request (URL ``{skyserver}/dr{DR}/en/tools/search/x_results.aspx``,
    ``cmd``, ``format=csv``, ``searchtool=SQL``); the answer is checked here rather
    than by astroquery's own parser, which cannot tell SkyServer's error page or an
    ``spExecuteSQL`` rejection from data.  Transport errors are retryable.

    Returns the astropy table (None for an empty result).
    """
    sdss, _conf, _ = _astroquery()
    try:
        response = sdss.query_sql_async(sql, data_release=dr, timeout=timeout_s, cache=False)
        answer = SqlAnswer(int(response.status_code), response.headers.get("Retry-After"), response.text)
    except (requests.Timeout, requests.ConnectionError) as exc:
        raise RetryableError(f"{type(exc).__name__}: {exc}") from exc
    except requests.exceptions.ChunkedEncodingError as exc:
        raise RetryableError(f"truncated response ({exc})") from exc
    return parse_sql_response(answer, dr=dr, sql=sql, junk=junk, rate_limit_wait_s=rate_limit_wait_s)


def _table_to_frame(table: Any, *, dr: int, expected: Sequence[str], junk: _JunkBudget) -> pd.DataFrame:
    """Check an answer has every ``expected`` column and no missing value; return it as a DataFrame."""
    # SQL Server may echo a column in its table's spelling (objID): match case-insensitively
    lower = {name.lower(): name for name in expected}
    for col in list(table.colnames):
        want = lower.get(col.lower())
        if want is not None and want != col and want not in table.colnames:
            table.rename_column(col, want)
    missing = [c for c in expected if c not in table.colnames]
    if missing:
        junk.retry_or_fail(
            f"junk table with columns {table.colnames[:3]}",
            f"SkyServer DR{dr} answered with a table lacking columns {missing[:5]} "
            f"(not the columns the query selects); got: {_snippet(table)!r}",
        )
    frame = table.to_pandas()
    incomplete = frame[list(expected)].isna().any(axis=1)
    if incomplete.any():
        row = int(np.flatnonzero(incomplete.to_numpy())[0])
        junk.retry_or_fail(
            f"incomplete CSV row {row} (truncated answer?)",
            f"SkyServer DR{dr} answered with an incomplete CSV table (row {row} has "
            f"missing values; truncated answer?): {_snippet(table)!r}",
        )
    return frame


@dataclass
class _QueryRun:
    """What the queries of one catalogue share: settings, the rate limiter, the log of SQL sent."""

    sdss: SdssConfig
    limiter: RateLimiter
    expected: list[str]
    sqls: list[str] = field(default_factory=list)
    n_queries: int = 0
    n_duplicates: int = 0


def _run_query(sql: str, run: _QueryRun) -> pd.DataFrame | None:
    """Send one SQL statement through astroquery, with rate limit and retries.

    Returns None for an empty result.  Raises :class:`SqlRejected` at once for a
    permanent SQL error or ``spExecuteSQL`` rejection (no retry), and
    :class:`SourceError` for anything else that is not the expected CSV table once
    the junk budget is spent, or when the retries are exhausted (a rate-limit
    rejection takes a retry, after ``rate_limit_wait_s``).
    """
    dr = run.sdss.data_release
    q = run.sdss.query
    junk = _JunkBudget(q.max_junk_retries)

    def attempt() -> pd.DataFrame | None:
        run.n_queries += 1
        table = _send_query(sql, dr=dr, timeout_s=q.timeout_s, junk=junk, rate_limit_wait_s=q.rate_limit_wait_s)
        return None if table is None else _table_to_frame(table, dr=dr, expected=run.expected, junk=junk)

    try:
        result, _ = call_with_retries(
            attempt,
            what=f"SkyServer DR{dr} SQL query",
            max_retries=q.max_retries,
            backoff_base_s=q.backoff_base_s,
            backoff_max_s=q.backoff_max_s,
            retry_after_max_s=max(300.0, q.rate_limit_wait_s),
            rng=random.Random(0),
            before_attempt=run.limiter.acquire,
        )
    except FetchError as exc:
        raise SourceError(f"{exc}; query: {sql[:160]}...") from exc
    return result


def _query_class(label: str, run: _QueryRun) -> pd.DataFrame:
    """Page through class ``label`` (keyset on objid) until ``n_per_class`` rows or an empty page.

    Returns the merged pages, the lowest ``n_per_class`` objids, with a ``label`` column.
    """
    sdss = run.sdss
    n_per_class = sdss.selection.n_per_class
    dr = sdss.data_release
    pages: list[pd.DataFrame] = []
    seen: set[int] = set()
    last = 0
    while len(seen) < n_per_class:
        sql = build_page_sql(sdss, label, top=min(sdss.query.page_size, n_per_class - len(seen)), after_objid=last)
        run.sqls.append(sql)
        page = _run_query(sql, run)
        if page is None or page.empty:
            break
        ids = page["objid"].astype(np.int64)
        dup = ids.duplicated() | ids.isin(seen)
        run.n_duplicates += int(dup.sum())
        page = page.loc[~dup.to_numpy()]
        if page.empty:
            break
        pages.append(page)
        seen.update(int(i) for i in page["objid"])
        new_last = int(ids.max())
        if new_last <= last:  # the server ignored the keyset bound: stop, do not loop
            raise SourceError(
                f"SkyServer DR{dr}: keyset paging did not advance past objid {last} "
                f"for class {label!r}; query: {sql[:160]}..."
            )
        last = new_last
    if not pages:
        raise SourceError(
            f"SkyServer DR{dr} ({base_url(sdss.skyserver_url)}) returned no rows for class {label!r} of label "
            f"scheme {sdss.labels.scheme!r}: widen sdss.selection; first query: "
            f"{build_page_sql(sdss, label, top=1)[:200]}..."
        )
    merged = pd.concat(pages, ignore_index=True).sort_values("objid", kind="stable")
    merged = merged.head(n_per_class).copy()
    merged["label"] = label
    return merged


def _finish(frame: pd.DataFrame, scheme: str) -> pd.DataFrame:
    """Cast, order and de-duplicate the merged pages."""
    out = frame.copy()
    out["objid"] = out["objid"].astype(np.int64)
    out["specobjid"] = out["specobjid"].astype(np.uint64)
    for c in _INT_COLUMNS:
        out[c] = out[c].astype(np.int64)
    float_cols = [c for c in PHOTO_COLUMNS if c not in ("objid", *_INT_COLUMNS)]
    for c in float_cols:
        out[c] = out[c].astype(np.float64)
    extra = [name for _, name in LABEL_COLUMNS[scheme] if name != "specobjid"]
    for name in extra:
        if name == "spec_class":
            out[name] = out[name].astype(str).str.strip()
        elif name in _LABEL_INT_COLUMNS or name.endswith("_flag"):
            out[name] = out[name].astype(np.int64)
        else:
            out[name] = out[name].astype(np.float64)
    out = out[[*OUTPUT_COLUMNS, *extra]]
    return out.sort_values(["label", "objid"], kind="stable").reset_index(drop=True)


def _drop_ambiguous(per_class: Sequence[pd.DataFrame]) -> tuple[pd.DataFrame, int]:
    """Concatenate the classes, dropping objects selected by two classes; return them and how many."""
    combined = pd.concat(per_class, ignore_index=True)
    ids = combined["objid"].astype(np.int64)
    ambiguous = ids.duplicated(keep=False)
    return combined.loc[~ambiguous.to_numpy()], int(ids[ambiguous].nunique())


def query_catalogue(
    sdss: SdssConfig | Mapping[str, Any], *, seed: int, bands: Sequence[str],
    rate_state_dir: PathLike | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Select a labelled galaxy catalogue on SkyServer.

    Parameters
    ----------
    sdss : SdssConfig or mapping
        The validated ``sdss:`` config section
        (``galpipe.config.build_section("sdss", {...})``; a mapping goes
        through :func:`sdss_section`).  ``skyserver_url``
        is applied through astroquery's own configuration
        (``astroquery.sdss.conf.skyserver_baseurl``) for the duration of the call.
    seed : int
        Recorded in the provenance (the selection itself is deterministic).
    bands : sequence of str
        Imaging bands of the run, recorded in the provenance; all five
        Petrosian magnitudes are returned regardless.
    rate_state_dir : path-like, optional
        Folder of the shared request budgets (:mod:`galpipe.sources.ratelimit`);
        default ``FRAME_CACHE_ROOT / "rate"`` (``resources/sdss/rate``).

    Returns
    -------
    catalogue : pandas.DataFrame
        One row per galaxy, sorted by ``label`` then ``objid``; columns
        :data:`OUTPUT_COLUMNS` (``objid`` int64, ``specobjid`` uint64 -- DR17
        spectrum ids exceed int64 -- ``run``/``rerun``/``camcol``/``field``
        int64, photometry float64, ``label`` str) followed by the scheme's
        label-source columns (vote fractions and flags, GZ2 debiased fractions and flags, or
        ``spec_class``/``redshift``).
    provenance : dict
        ``sql`` (every statement sent, in order), ``data_release``,
        ``queried_at_utc``, ``skyserver_url``, ``astroquery_version``,
        ``galpipe_version``, ``label_scheme``, ``classes``, ``counts`` (rows per
        class), ``n_queries``, ``n_duplicates_dropped``,
        ``n_ambiguous_dropped``, ``seed``.

    Raises
    ------
    ConfigError
        A mapping ``sdss`` is not a valid section.
    SourceError
        Empty result for a class, an HTML/junk answer, an SQL error reported by
        SkyServer, or retries exhausted; the message names the DR.
    """
    sdss = sdss_section(sdss)
    scheme = sdss.labels.scheme
    classes = label_classes(sdss)
    build_queries(sdss)  # every statement can be built before the first request
    # one SQL budget per SkyServer host, shared by every process using resources/sdss (ratelimit.SQL_SCOPE)
    limiter = RateLimiter.for_service(sdss.query.max_queries_per_minute / 60.0, burst=1, url=sdss.skyserver_url,
                                      state_dir=FRAME_CACHE_ROOT / "rate" if rate_state_dir is None
                                      else rate_state_dir, scope="sql")
    run = _QueryRun(sdss=sdss, limiter=limiter,
                    expected=[name for _, name in select_columns(scheme)])
    _sdss, conf, aq_version = _astroquery()
    started = datetime.now(UTC)
    t0 = time.monotonic()
    with conf.set_temp("skyserver_baseurl", base_url(sdss.skyserver_url)):
        per_class = [_query_class(label, run) for label in classes]
    combined, n_ambiguous = _drop_ambiguous(per_class)
    catalogue = _finish(combined, scheme)
    provenance = _provenance(sdss, run, catalogue, classes=classes, started=started,
                             duration_s=time.monotonic() - t0, astroquery_version=aq_version)
    provenance.update({"n_ambiguous_dropped": n_ambiguous, "seed": int(seed), "bands": list(bands)})
    return catalogue, provenance


def _provenance(sdss: SdssConfig, run: _QueryRun, catalogue: pd.DataFrame, *, classes: list[str],
                started: datetime, duration_s: float, astroquery_version: str) -> dict[str, Any]:
    """What :func:`query_catalogue` sent and got (see its ``provenance``), ambiguity/seed/bands aside."""
    dr = sdss.data_release
    base = base_url(sdss.skyserver_url)
    endpoint = "x_results.aspx" if dr > 10 else ("x_sql.aspx" if dr == 10 else "x_sql.asp")
    return {
        "source": "sdss",
        "sql": run.sqls,
        "data_release": dr,
        "queried_at_utc": started.isoformat(timespec="seconds"),
        "duration_s": round(duration_s, 3),
        "skyserver_url": base,
        "query_endpoint": f"{base}/dr{dr}/en/tools/search/{endpoint}",
        "astroquery_version": astroquery_version,
        "galpipe_version": __version__,
        "label_scheme": sdss.labels.scheme,
        "classes": classes,
        "n_per_class": sdss.selection.n_per_class,
        "counts": {k: int((catalogue["label"] == k).sum()) for k in classes},
        "n_queries": run.n_queries,
        "n_duplicates_dropped": run.n_duplicates,
    }


# --------------------------------------------------------------------------- positions -> nearest PhotoPrimary
#: Match radius of :func:`query_nearest`, arcsec: SkyServer's own CrossID default (``crossidRadius``
#: 3.0, sciserver/SkyServer-DR13 commit 887e40e47a1409411b45d46537a73965a0aa087e, Web.config.example line 48).
NEAREST_RADIUS_ARCSEC = 3.0
#: Longest query string one SQL request may have: astroquery sends the statement in the URL
#: (``GET x_results.aspx?cmd=...``, astroquery.sdss.core ``query_sql_async``), and ASP.NET and IIS
#: refuse query strings over 2048 characters by default (``httpRuntime maxQueryStringLength``,
#: ``requestLimits maxQueryString``), which SkyServer's Web.config.example (DR13 site) does not raise.
QUERY_STRING_MAX = 2048
#: Columns of a :func:`build_nearest_sql` answer, in order (``distance`` in arcmin, as
#: ``fGetNearestObjEq`` returns it).
NEAREST_COLUMNS: tuple[str, ...] = ("row_index", "objid", "ra", "dec", "petroR90_r", "distance")
#: Most positions in one statement (a page is also bounded by :data:`QUERY_STRING_MAX`).
NEAREST_PAGE_MAX = 500


def _check_position(k: int, ra: object, dec: object) -> tuple[float, float]:
    for name, value, lo, hi in (("ra", ra, 0.0, 360.0), ("dec", dec, -90.0, 90.0)):
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating) \
                or not math.isfinite(float(value)) or not lo <= float(value) <= hi:
            raise ConfigError(f"positions[{k}]: {name} {_show(value)} is not a number in [{lo:g}, {hi:g}] degrees")
    return float(ra), float(dec)  # type: ignore[arg-type]


def build_nearest_sql(positions: Sequence[tuple[int, float, float]], *,
                      radius_arcsec: float = NEAREST_RADIUS_ARCSEC) -> str:
    """SQL that finds, for every position, the nearest ``PhotoPrimary`` object within ``radius_arcsec``.

    ::

        SELECT TOP {n} v.row_index, p.objid, p.ra, p.dec, p.petroR90_r, n.distance
        FROM (VALUES (0, ra0, dec0), (1, ra1, dec1), ...) AS v (row_index, ra, dec)
        CROSS APPLY dbo.fGetNearestObjEq(v.ra, v.dec, {radius in arcmin}) AS n
        JOIN PhotoPrimary AS p ON p.objid = n.objid ORDER BY v.row_index

    ``fGetNearestObjEq`` returns the closest primary object within ``@r`` arcmin, or no
    row (sciserver/sqlloader schema/sql/spNearby.sql, ``CREATE FUNCTION fGetNearestObjEq``);
    ``CROSS APPLY`` keeps only positions that have one, so a position without a match
    is simply absent from the answer.

    Parameters
    ----------
    positions : sequence of (int, float, float)
        ``(row_index, ra, dec)``: a caller's row number (0..10**9, distinct) and a position in
        degrees (ra in [0, 360], dec in [-90, 90]); 1 to :data:`NEAREST_PAGE_MAX` of them.
    radius_arcsec : float
        Match radius, (0, 60] arcsec.

    Returns
    -------
    str
        One statement; every number formatted by :func:`sql_int`/:func:`sql_float`.

    Raises
    ------
    ConfigError
        An empty or too long list, a repeated row index, a position or radius out of range
        (the message names ``positions[k]`` or ``radius_arcsec``).
    """
    if not 1 <= len(positions) <= NEAREST_PAGE_MAX:
        raise ConfigError(f"positions: expected 1 to {NEAREST_PAGE_MAX} positions, got {len(positions)}")
    if isinstance(radius_arcsec, bool) or not isinstance(radius_arcsec, int | float) \
            or not 0 < float(radius_arcsec) <= 60:
        raise ConfigError(f"radius_arcsec: expected a number in (0, 60] arcsec, got {_show(radius_arcsec)}")
    rows, seen = [], set()
    for k, item in enumerate(positions):
        index = check_integer(f"positions[{k}] row index", item[0], 0, 10**9)
        if index in seen:
            raise ConfigError(f"positions[{k}]: row index {index} repeated")
        seen.add(index)
        ra, dec = _check_position(k, item[1], item[2])
        rows.append(f"({sql_int(index)}, {sql_float(ra)}, {sql_float(dec)})")
    return (f"SELECT TOP {sql_int(len(rows))} v.row_index, p.objid, p.ra, p.dec, p.petroR90_r, n.distance "
            f"FROM (VALUES {', '.join(rows)}) AS v (row_index, ra, dec) "
            f"CROSS APPLY dbo.fGetNearestObjEq(v.ra, v.dec, {sql_float(float(radius_arcsec) / 60.0)}) AS n "
            "JOIN PhotoPrimary AS p ON p.objid = n.objid ORDER BY v.row_index")


def sql_query_string_length(sql: str, dr: int) -> int:
    """Characters of the query string astroquery sends for ``sql`` (``cmd``, ``format`` and, after DR11,
    ``searchtool``, URL-encoded as requests encodes them)."""
    from urllib.parse import urlencode

    payload = {"cmd": " " + sql, "format": "csv"}  # astroquery's __sanitize_query prefixes each line with " "
    if dr > 11:
        payload["searchtool"] = "SQL"
    return len(urlencode(payload))


def nearest_pages(positions: Sequence[tuple[int, float, float]], *, dr: int,
                  radius_arcsec: float = NEAREST_RADIUS_ARCSEC) -> list[list[tuple[int, float, float]]]:
    """``positions`` cut into consecutive pages whose :func:`build_nearest_sql` fits :data:`QUERY_STRING_MAX`.

    Raises
    ------
    ConfigError
        As :func:`build_nearest_sql`.
    """
    pages: list[list[tuple[int, float, float]]] = []
    page: list[tuple[int, float, float]] = []
    for item in positions:
        trial = [*page, item]
        too_long = sql_query_string_length(build_nearest_sql(trial, radius_arcsec=radius_arcsec), dr) > \
            QUERY_STRING_MAX
        if page and (too_long or len(trial) > NEAREST_PAGE_MAX):
            pages.append(page)
            page = [item]
        else:
            page = trial
    if page:
        pages.append(page)
    return pages


def query_nearest(sdss: SdssConfig | Mapping[str, Any], positions: Sequence[tuple[int, float, float]], *,
                  radius_arcsec: float = NEAREST_RADIUS_ARCSEC,
                  rate_state_dir: PathLike | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The nearest ``PhotoPrimary`` object of each position, one SkyServer query per page of positions.

    Pages come from :func:`nearest_pages`; each goes through the catalogue queries' client
    (astroquery, the shared SQL request budget, retries, SkyServer's error answers).

    Parameters
    ----------
    sdss : SdssConfig or mapping
        The ``sdss:`` section (``skyserver_url``, ``data_release``, ``query`` used).
    positions : sequence of (int, float, float)
        ``(row_index, ra, dec)``, as for :func:`build_nearest_sql`.
    radius_arcsec : float
        Match radius.
    rate_state_dir : path-like, optional
        Folder of the shared request budgets; default ``FRAME_CACHE_ROOT / "rate"``.

    Returns
    -------
    matches : pandas.DataFrame
        One row per position that has a match (positions without one are absent):
        ``row_index`` (int64), ``objid`` (int64), ``ra``, ``dec``, ``petroR90_r`` (arcsec) of the
        object and ``distance_arcsec`` (float64), in ``row_index`` order.
    provenance : dict
        ``sql`` (every statement sent), ``n_queries``, ``data_release``, ``skyserver_url``,
        ``radius_arcsec``.

    Raises
    ------
    ConfigError
        A bad position or radius (before anything is sent).
    SourceError
        As :func:`query_catalogue`.
    """
    sdss = sdss_section(sdss)
    pages = nearest_pages(positions, dr=sdss.data_release, radius_arcsec=radius_arcsec) if positions else []
    limiter = RateLimiter.for_service(sdss.query.max_queries_per_minute / 60.0, burst=1, url=sdss.skyserver_url,
                                      state_dir=FRAME_CACHE_ROOT / "rate" if rate_state_dir is None
                                      else rate_state_dir, scope="sql")
    run = _QueryRun(sdss=sdss, limiter=limiter, expected=list(NEAREST_COLUMNS))
    _sdss, conf, _ = _astroquery()
    frames = []
    with conf.set_temp("skyserver_baseurl", base_url(sdss.skyserver_url)):
        for page in pages:
            sql = build_nearest_sql(page, radius_arcsec=radius_arcsec)
            run.sqls.append(sql)
            got = _run_query(sql, run)
            if got is not None and not got.empty:
                frames.append(got[list(NEAREST_COLUMNS)])
    out = pd.DataFrame({
        "row_index": pd.Series(dtype=np.int64), "objid": pd.Series(dtype=np.int64),
        "ra": pd.Series(dtype=np.float64), "dec": pd.Series(dtype=np.float64),
        "petroR90_r": pd.Series(dtype=np.float64), "distance_arcsec": pd.Series(dtype=np.float64)})
    if frames:
        got = pd.concat(frames, ignore_index=True)
        asked = {int(p[0]) for p in positions}
        index = got["row_index"].astype(np.int64)
        if not set(index) <= asked or index.duplicated().any():
            raise SourceError(f"SkyServer DR{sdss.data_release} answered the position look-up with row indices "
                              f"that were not asked for, or twice: {sorted(set(index) - asked)[:5]}")
        out = pd.DataFrame({"row_index": index, "objid": got["objid"].astype(np.int64),
                            "ra": got["ra"].astype(np.float64), "dec": got["dec"].astype(np.float64),
                            "petroR90_r": got["petroR90_r"].astype(np.float64),
                            "distance_arcsec": got["distance"].astype(np.float64) * 60.0})
        out = out.sort_values("row_index", kind="stable").reset_index(drop=True)
    prov = {"sql": run.sqls, "n_queries": run.n_queries, "data_release": sdss.data_release,
            "skyserver_url": base_url(sdss.skyserver_url), "radius_arcsec": float(radius_arcsec)}
    return out, prov


# --------------------------------------------------------------------------- the source
#: Root of the SDSS frame cache (shared by every configuration), relative to the working directory.
FRAME_CACHE_ROOT = Path("resources") / "sdss"


@register_source
class SdssSource(NoLocalFiles):
    """Source ``sdss``: the live SDSS services (SkyServer SQL, SAS frames or SkyServer JPEGs).

    Parameters
    ----------
    cfg : Config
        The whole validated configuration; uses ``sdss``, ``seed``, ``bands``
        (ugriz for ``sdss-frames``, ``[red, green, blue]`` for
        ``skyserver-jpeg``; checked by :func:`galpipe.config.cross_field_checks`)
        and ``cutout_size``.
    frame_cache_dir : path-like
        Root of the frame cache (``sdss-frames``); :data:`FRAME_CACHE_ROOT` by default.
    """

    name: ClassVar[str] = "sdss"

    def __init__(self, cfg: Config, *, frame_cache_dir: PathLike = FRAME_CACHE_ROOT) -> None:
        self.cfg = cfg
        self.section: SdssConfig = cfg.sdss
        self.frame_cache_dir = Path(frame_cache_dir)

    @property
    def bands(self) -> tuple[str, ...]:
        """``cfg.bands``: SDSS bands of the frames, or ``("red", "green", "blue")`` for JPEGs."""
        return tuple(self.cfg.bands)

    @property
    def catalogue_columns(self) -> tuple[str, ...]:
        """What the configured provider reads: position, and the field of a frame or the size for JPEG scaling."""
        from galpipe.sources.sdss_cutouts import _needed_columns

        return tuple(_needed_columns(self.cfg.sdss.cutouts))

    @property
    def crop_fraction(self) -> float:
        """1.0: stamps are cut around each galaxy, an external image is not cropped."""
        return 1.0

    @property
    def shard_group_columns(self) -> tuple[str, ...]:
        """``sdss-frames``: the field (``run, rerun, camcol, field``), so all of a field's galaxies
        share a shard and each frame is fetched by one job; JPEGs: none (one request per galaxy)."""
        if self.section.cutouts.provider == "sdss-frames":
            return ("run", "rerun", "camcol", "field")
        return ()

    def params(self) -> dict[str, Any]:
        """``source``, ``seed``, the ``sdss`` section, ``bands`` and ``cutout_size`` (plain data)."""
        return {
            "source": self.name,
            "seed": int(self.cfg.seed),
            "sdss": self.section.to_dict(),
            "bands": list(self.cfg.bands),
            "cutout_size": int(self.cfg.cutout_size),
        }

    def catalogue(self) -> tuple[pd.DataFrame, dict[str, Any]]:
        """The SkyServer selection (:func:`query_catalogue`) and its provenance."""
        return query_catalogue(self.section, seed=self.cfg.seed, bands=self.cfg.bands,
                               rate_state_dir=self.frame_cache_dir / "rate")

    def make_cutouts(self, shard: pd.DataFrame, cache: CutoutCache, *, progress: bool = False) -> pd.DataFrame:
        """Fetch the cutouts of ``shard`` into ``cache`` (:func:`galpipe.sources.sdss_cutouts.fetch_cutouts`).

        Galaxies that could not be fetched are in the manifest with
        ``status="failed"`` and the reason; the caller applies ``max_reject_fraction``.
        """
        from galpipe.sources.sdss_cutouts import fetch_cutouts

        return fetch_cutouts(shard, cache, sdss=self.section, bands=self.cfg.bands, size=int(self.cfg.cutout_size),
                             frame_cache_dir=self.frame_cache_dir, progress=progress)
