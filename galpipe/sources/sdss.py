"""Live SDSS catalogue: validated SQL builders and an astroquery client.

The catalogue is selected on SkyServer with :meth:`astroquery.sdss.SDSS.query_sql`
(``GET {skyserver_url}/dr{DR}/en/tools/search/x_results.aspx?cmd=...&format=csv``),
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

Label schemes (``sdss.labels.scheme``):

``gz1_flags``
    Galaxy Zoo 1 ``ZooSpec`` joined to ``PhotoObj`` (on ``objid``) and
    ``SpecObj`` (on ``specobjid``); ``spiral`` = ``z.spiral = 1``,
    ``elliptical`` = ``z.elliptical = 1``, always with ``z.uncertain = 0``
    (the debiased, 80 per cent "clean" flags of Lintott et al. 2011).
``gz1_fractions``
    The same tables; each class is defined by thresholds on GZ1 vote fractions,
    ``{column: minimum}`` or ``{column: {min: .., max: ..}}`` with columns from
    :data:`GZ1_FRACTION_COLUMNS`.
``gz2``
    Galaxy Zoo 2 ``zoo2MainSpecz`` joined on ``dr8objid``/``specobjid``; the
    first letter of ``gz2class`` gives the class: ``E...`` -> ``elliptical``,
    ``S...`` -> ``spiral`` (barred ``SB...`` and edge-on ``Se...`` included);
    ``A`` (star/artifact) is never selected.
``spec_class``
    ``SpecObj.class`` of the best spectrum: ``galaxy``/``star``/``qso``
    (``GALAXY``/``STAR``/``QSO``), joined on ``s.bestobjid = p.objid``.

Security: the SQL is assembled only from range-checked numbers (formatted with
fixed precision, never pasted), integers, and table/column/literal strings
taken from fixed whitelists in this module; a string where a number is
expected, or a name outside a whitelist, raises :class:`ConfigError` naming
the key.
"""

from __future__ import annotations

import math
import random
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import requests

from galpipe import __version__
from galpipe.errors import ConfigError, SourceError
from galpipe.sources.download import (
    RETRY_STATUSES,
    FetchError,
    RateLimiter,
    RetryableError,
    call_with_retries,
    parse_retry_after,
)

# --------------------------------------------------------------------------- defaults
#: Defaults of the ``sdss:`` config section (mirrors workflow/schemas/sdss.schema.yaml).
DEFAULTS: dict[str, Any] = {
    "data_release": 17,
    "skyserver_url": "https://skyserver.sdss.org",
    "sas_url": "https://data.sdss.org/sas",
    "labels": {
        "scheme": "gz1_flags",
        "classes": None,
        "fractions": {
            "elliptical": {"p_el_debiased": 0.8},
            "spiral": {"p_cs_debiased": 0.8},
        },
    },
    "selection": {
        "ra_min": 0.0,
        "ra_max": 360.0,
        "dec_min": -90.0,
        "dec_max": 90.0,
        "petro_mag_r_min": 10.0,
        "petro_mag_r_max": 17.77,
        "petro_r90_r_min": 0.0,
        "petro_r90_r_max": 600.0,
        "n_per_class": 500,
    },
    "query": {
        "page_size": 5000,
        "max_queries_per_minute": 30.0,
        "timeout_s": 120.0,
        "max_retries": 4,
        "backoff_base_s": 2.0,
        "backoff_max_s": 60.0,
        "max_junk_retries": 2,
    },
    "cutouts": {
        "provider": "sdss-frames",
        "cache_max_mb": 4096.0,
        "frame_shape": [1489, 2048],
        "jpeg_scale_mode": "fixed",
        "jpeg_scale": 0.396,
        "jpeg_span_r90": 8.48,
    },
    "download": {
        "concurrency": 4,
        "requests_per_second": 5.0,
        "burst": 1,
        "timeout_s": 60.0,
        "max_retries": 5,
        "backoff_base_s": 1.0,
        "backoff_max_s": 60.0,
        "retry_after_max_s": 300.0,
        "max_failure_fraction": 0.05,
    },
}

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
#: Galaxy Zoo 1 vote-fraction columns of ``ZooSpec`` usable in thresholds.
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
#: ``gz2class`` first letter of each GZ2 class (fixed literals, never user text).
GZ2_PREFIX: dict[str, str] = {"elliptical": "E", "spiral": "S"}
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
        ("s.specobjid", "specobjid"),
        ("z.nvote", "nvote"),
        *((f"z.{c}", c) for c in GZ1_FRACTION_COLUMNS),
        ("z.spiral", "spiral"),
        ("z.elliptical", "elliptical"),
        ("z.uncertain", "uncertain"),
    ),
    "gz2": (
        ("s.specobjid", "specobjid"),
        ("z.gz2class", "gz2class"),
        ("z.total_classifications", "total_classifications"),
    ),
    "spec_class": (
        ("s.specobjid", "specobjid"),
        ("s.class", "spec_class"),
        ("s.z", "redshift"),
    ),
}
LABEL_COLUMNS["gz1_fractions"] = LABEL_COLUMNS["gz1_flags"]

_FROM: dict[str, str] = {
    "gz1_flags": (
        "FROM ZooSpec AS z JOIN PhotoObj AS p ON p.objid = z.objid JOIN SpecObj AS s ON s.specobjid = z.specobjid"
    ),
    "gz2": (
        "FROM zoo2MainSpecz AS z JOIN PhotoObj AS p ON p.objid = z.dr8objid "
        "JOIN SpecObj AS s ON s.specobjid = z.specobjid"
    ),
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
_LABEL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MAX_OBJID = 2**63 - 1


# --------------------------------------------------------------------------- validation
def _lookup(params: Mapping[str, Any] | None, path: str) -> Any:
    """Value of dotted ``path`` in ``params`` (the ``sdss:`` section), else the default."""
    default: Any = DEFAULTS
    for part in path.split("."):
        default = default.get(part) if isinstance(default, Mapping) else None
    node: Any = params if params is not None else {}
    walked = ["sdss"]
    for part in path.split("."):
        if not isinstance(node, Mapping):  # a typo like `selection: 10` must not silently mean defaults
            raise ConfigError(f"{'.'.join(walked)}: expected a mapping, got {type(node).__name__} {_show(node)}")
        if part not in node:
            return default
        node = node[part]
        walked.append(part)
    return node


def _number(params: Mapping[str, Any] | None, path: str, lo: float, hi: float) -> float:
    value = _lookup(params, path)
    return check_number(f"sdss.{path}", value, lo, hi)


def _integer(params: Mapping[str, Any] | None, path: str, lo: int, hi: int) -> int:
    value = _lookup(params, path)
    return check_integer(f"sdss.{path}", value, lo, hi)


def _show(value: object) -> str:
    """A short repr for messages (a huge int has no repr beyond 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 100:
        return f"<integer of {value.bit_length()} bits>"
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def check_number(key: str, value: object, lo: float, hi: float) -> float:
    """Return ``value`` as a finite float in ``[lo, hi]``.

    Raises
    ------
    ConfigError
        ``value`` is a string, bool, None, NaN/inf or out of range; the message
        names ``key``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigError(f"{key}: expected a number in [{lo}, {hi}], got {type(value).__name__} {_show(value)}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond float range
        v = math.inf
    if not math.isfinite(v) or not lo <= v <= hi:
        raise ConfigError(f"{key}: expected a number in [{lo}, {hi}], got {_show(value)}")
    return v


def check_integer(key: str, value: object, lo: int, hi: int) -> int:
    """Return ``value`` as an int in ``[lo, hi]`` (no bools, no strings, no floats)."""
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


def data_release(params: Mapping[str, Any] | None) -> int:
    """The validated ``sdss.data_release`` (8..19)."""
    return _integer(params, "data_release", 8, 19)


def _url(params: Mapping[str, Any] | None, key: str) -> str:
    value = _lookup(params, key)
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s]+", value):
        raise ConfigError(f"sdss.{key}: expected an http(s) URL, got {_show(value)}")
    return value.rstrip("/")


def skyserver_url(params: Mapping[str, Any] | None) -> str:
    """``sdss.skyserver_url`` without a trailing slash (astroquery's ``skyserver_baseurl``)."""
    return _url(params, "skyserver_url")


def sas_url(params: Mapping[str, Any] | None) -> str:
    """``sdss.sas_url`` without a trailing slash (astroquery's ``sas_baseurl``)."""
    return _url(params, "sas_url")


def label_scheme(params: Mapping[str, Any] | None) -> str:
    """The validated ``sdss.labels.scheme``."""
    scheme = _lookup(params, "labels.scheme")
    if not isinstance(scheme, str) or scheme not in SCHEME_CLASSES:
        raise ConfigError(f"sdss.labels.scheme: expected one of {sorted(SCHEME_CLASSES)}, got {_show(scheme)}")
    return scheme


def _fractions(params: Mapping[str, Any] | None) -> dict[str, dict[str, tuple[float, float]]]:
    """Validated ``sdss.labels.fractions``: class -> column -> (min, max)."""
    raw = _lookup(params, "labels.fractions")
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError("sdss.labels.fractions: expected a non-empty mapping class -> {column: threshold}")
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for cls, conds in raw.items():
        key = f"sdss.labels.fractions.{cls}"
        if not isinstance(cls, str) or not _LABEL_NAME.fullmatch(cls):
            raise ConfigError(f"sdss.labels.fractions: class name {_show(cls)} must match {_LABEL_NAME.pattern}")
        if not isinstance(conds, Mapping) or not conds:
            raise ConfigError(f"{key}: expected a non-empty mapping column -> threshold")
        out[cls] = {}
        for col, spec in conds.items():
            if col not in GZ1_FRACTION_COLUMNS:
                raise ConfigError(
                    f"{key}: column {_show(col)} is not a GZ1 vote fraction; "
                    f"expected one of {list(GZ1_FRACTION_COLUMNS)}"
                )
            if isinstance(spec, Mapping):
                extra = set(spec) - {"min", "max"}
                if extra or not spec:
                    raise ConfigError(f"{key}.{col}: expected keys 'min' and/or 'max', got {sorted(spec, key=str)}")
                lo = check_number(f"{key}.{col}.min", spec.get("min", 0.0), 0.0, 1.0)
                hi = check_number(f"{key}.{col}.max", spec.get("max", 1.0), 0.0, 1.0)
                if lo > hi:
                    raise ConfigError(f"{key}.{col}: min {lo} is larger than max {hi}")
            else:
                lo, hi = check_number(f"{key}.{col}", spec, 0.0, 1.0), 1.0
            out[cls][col] = (lo, hi)
    return out


def label_classes(params: Mapping[str, Any] | None) -> list[str]:
    """The validated list of classes to select (``sdss.labels.classes`` or the scheme's)."""
    scheme = label_scheme(params)
    classes = _lookup(params, "labels.classes")
    if scheme == "gz1_fractions":
        known: Sequence[str] = list(_fractions(params))
    else:
        known = SCHEME_CLASSES[scheme]
    if classes is None:
        classes = list(known if scheme == "gz1_fractions" else SCHEME_DEFAULT_CLASSES[scheme])
    if isinstance(classes, str) or not isinstance(classes, Sequence) or not classes:
        raise ConfigError(f"sdss.labels.classes: expected a non-empty list of class names, got {_show(classes)}")
    out: list[str] = []
    for cls in classes:
        if not isinstance(cls, str) or cls not in known:
            raise ConfigError(
                f"sdss.labels.classes: {_show(cls)} is not a class of scheme {scheme!r}; expected some of {list(known)}"
            )
        if cls in out:
            raise ConfigError(f"sdss.labels.classes: {_show(cls)} is listed twice")
        out.append(cls)
    return out


def validate_bands(bands: Sequence[str], *, key: str = "bands") -> list[str]:
    """Check that ``bands`` is a non-empty list of distinct SDSS bands (ugriz)."""
    if isinstance(bands, str) or not isinstance(bands, Sequence) or not bands:
        raise ConfigError(f"{key}: expected a non-empty list of SDSS bands, got {_show(bands)}")
    out: list[str] = []
    for b in bands:
        if b not in BANDS:
            raise ConfigError(f"{key}: {_show(b)} is not an SDSS band; expected some of {list(BANDS)}")
        if b in out:
            raise ConfigError(f"{key}: band {_show(b)} is listed twice")
        out.append(b)
    return out


# --------------------------------------------------------------------------- SQL builders
def build_selection_where(params: Mapping[str, Any] | None) -> list[str]:
    """SQL conditions of the sky/magnitude/size selection (``sdss.selection``).

    An RA range with ``ra_min > ra_max`` wraps through 0 (e.g. 350..10 deg).

    Returns
    -------
    list of str
        Conditions to AND together, e.g. ``"p.dec BETWEEN -1.00000000 AND 1.00000000"``.
    """
    ra_min = _number(params, "selection.ra_min", 0.0, 360.0)
    ra_max = _number(params, "selection.ra_max", 0.0, 360.0)
    dec_min = _number(params, "selection.dec_min", -90.0, 90.0)
    dec_max = _number(params, "selection.dec_max", -90.0, 90.0)
    mag_min = _number(params, "selection.petro_mag_r_min", 0.0, 40.0)
    mag_max = _number(params, "selection.petro_mag_r_max", 0.0, 40.0)
    r90_min = _number(params, "selection.petro_r90_r_min", 0.0, 3600.0)
    r90_max = _number(params, "selection.petro_r90_r_max", 0.0, 3600.0)
    for lo_key, lo, hi_key, hi in (
        ("dec_min", dec_min, "dec_max", dec_max),
        ("petro_mag_r_min", mag_min, "petro_mag_r_max", mag_max),
        ("petro_r90_r_min", r90_min, "petro_r90_r_max", r90_max),
    ):
        if lo > hi:
            raise ConfigError(f"sdss.selection.{lo_key} ({lo}) is larger than sdss.selection.{hi_key} ({hi})")
    where: list[str] = []
    if ra_min <= ra_max:
        if not (ra_min == 0.0 and ra_max == 360.0):
            where.append(f"p.ra BETWEEN {sql_float(ra_min)} AND {sql_float(ra_max)}")
    else:
        where.append(f"(p.ra >= {sql_float(ra_min)} OR p.ra <= {sql_float(ra_max)})")
    if not (dec_min == -90.0 and dec_max == 90.0):
        where.append(f"p.dec BETWEEN {sql_float(dec_min)} AND {sql_float(dec_max)}")
    where.append(f"p.petroMag_r BETWEEN {sql_float(mag_min)} AND {sql_float(mag_max)}")
    where.append(f"p.petroR90_r BETWEEN {sql_float(r90_min)} AND {sql_float(r90_max)}")
    return where


def build_class_where(params: Mapping[str, Any] | None, label: str) -> list[str]:
    """SQL conditions that define class ``label`` under the configured scheme."""
    scheme = label_scheme(params)
    if label not in label_classes(params):
        raise ConfigError(f"sdss.labels.classes: {label!r} is not a selected class of scheme {scheme!r}")
    if scheme == "gz1_flags":
        return [f"z.{label} = 1", "z.uncertain = 0"]
    if scheme == "gz1_fractions":
        conds: list[str] = []
        for col, (lo, hi) in sorted(_fractions(params)[label].items()):
            if lo > 0.0:
                conds.append(f"z.{col} >= {sql_float(lo)}")
            if hi < 1.0:
                conds.append(f"z.{col} <= {sql_float(hi)}")
        if not conds:
            raise ConfigError(
                f"sdss.labels.fractions.{label}: thresholds select everything "
                "(min 0 and max 1); give at least one real cut"
            )
        return conds
    if scheme == "gz2":
        return [f"z.gz2class LIKE '{GZ2_PREFIX[label]}%'"]
    return [f"s.class = '{SPEC_CLASS_VALUE[label]}'"]


def select_columns(scheme: str) -> list[tuple[str, str]]:
    """``(SQL expression, output name)`` pairs selected for ``scheme``."""
    if scheme not in LABEL_COLUMNS:
        raise ConfigError(f"sdss.labels.scheme: unknown scheme {scheme!r}")
    return [(f"p.{c}", c) for c in PHOTO_COLUMNS] + list(LABEL_COLUMNS[scheme])


def build_page_sql(params: Mapping[str, Any] | None, label: str, *, top: int, after_objid: int = 0) -> str:
    """SQL of one keyset page of class ``label``.

    Parameters
    ----------
    params : mapping
        The ``sdss:`` config section.
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
    """
    scheme = label_scheme(params)
    top = check_integer("top", top, 1, 500_000)
    after = check_integer("after_objid", after_objid, 0, MAX_OBJID)
    cols = ", ".join(
        expr if expr.split(".", 1)[1] == name else f"{expr} AS {name}" for expr, name in select_columns(scheme)
    )
    where = build_class_where(params, label) + build_selection_where(params)
    where.append(f"p.objid > {sql_int(after)}")
    return f"SELECT TOP {sql_int(top)} {cols} {_FROM[scheme]} WHERE {' AND '.join(where)} ORDER BY p.objid"


def build_queries(params: Mapping[str, Any] | None) -> dict[str, str]:
    """First-page SQL of every selected class (a dry run of what will be sent).

    Validates every setting that reaches SQL (and ``data_release``) first.
    """
    data_release(params)
    page = query_settings(params)["page_size"]
    n = _integer(params, "selection.n_per_class", 1, 10_000_000)
    return {label: build_page_sql(params, label, top=min(page, n)) for label in label_classes(params)}


def query_settings(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validated ``sdss.query`` settings."""
    section = _lookup(params, "query")
    if not isinstance(section, Mapping):
        raise ConfigError(f"sdss.query: expected a mapping, got {_show(section)}")
    unknown = sorted(set(section) - set(DEFAULTS["query"]), key=str)
    if unknown:
        raise ConfigError(f"sdss.query: unknown key(s) {unknown}; expected some of {sorted(DEFAULTS['query'])}")
    return {
        "page_size": _integer(params, "query.page_size", 1, 500_000),
        "max_queries_per_minute": _number(params, "query.max_queries_per_minute", 0.0, 6000.0),
        "timeout_s": _number(params, "query.timeout_s", 0.001, 3600.0),
        "max_retries": _integer(params, "query.max_retries", 0, 50),
        "backoff_base_s": _number(params, "query.backoff_base_s", 0.0, 3600.0),
        "backoff_max_s": _number(params, "query.backoff_max_s", 0.0, 3600.0),
        "max_junk_retries": _integer(params, "query.max_junk_retries", 0, 50),
    }


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


def _run_query(
    sql: str,
    *,
    dr: int,
    settings: Mapping[str, Any],
    limiter: RateLimiter,
    expected: Sequence[str],
    stats: dict[str, int],
) -> pd.DataFrame | None:
    """Send one SQL statement through astroquery, with rate limit and retries.

    Returns None for an empty result; raises SourceError for anything that
    is not the expected CSV table.
    """
    from astroquery.exceptions import RemoteServiceError

    sdss, _conf, _ = _astroquery()
    junk_left = [settings["max_junk_retries"]]

    def attempt() -> pd.DataFrame | None:
        stats["queries"] = stats.get("queries", 0) + 1
        try:
            with warnings.catch_warnings():
                # ids above 2**63 (DR17 spectra) are read as text; astroquery casts them to uint64
                warnings.filterwarnings(
                    "ignore", message=r"OverflowError converting to IntType in column .*obj"
                )
                table = sdss.query_sql(
                    sql, data_release=dr, timeout=settings["timeout_s"], cache=False
                )
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status in RETRY_STATUSES:
                retry_after = parse_retry_after(
                    exc.response.headers.get("Retry-After") if exc.response is not None else None
                )
                raise RetryableError(f"HTTP {status}", retry_after) from exc
            raise SourceError(f"SkyServer DR{dr} refused the query (HTTP {status}): {sql[:160]}...") from exc
        except (requests.Timeout, requests.ConnectionError) as exc:
            raise RetryableError(f"{type(exc).__name__}: {exc}") from exc
        except requests.exceptions.ChunkedEncodingError as exc:
            raise RetryableError(f"truncated response ({exc})") from exc
        except RemoteServiceError as exc:
            raise SourceError(
                f"SkyServer DR{dr} reported an error for the query: {' '.join(str(exc).split())[:300]}"
            ) from exc
        except ValueError as exc:  # astropy's CSV reader choking on an HTML page
            if junk_left[0] > 0:
                junk_left[0] -= 1
                raise RetryableError(f"unparsable response ({exc})") from exc
            raise SourceError(
                f"SkyServer DR{dr} answered with something that is not a CSV table "
                f"(an HTML error page?): {' '.join(str(exc).split())[:200]}"
            ) from exc
        if table is None:
            return None
        # SQL Server may echo a column in its table's spelling (objID): match case-insensitively
        lower = {name.lower(): name for name in expected}
        for col in list(table.colnames):
            want = lower.get(col.lower())
            if want is not None and want != col and want not in table.colnames:
                table.rename_column(col, want)
        missing = [c for c in expected if c not in table.colnames]
        if missing:
            if junk_left[0] > 0:
                junk_left[0] -= 1
                raise RetryableError(f"junk table with columns {table.colnames[:3]}")
            raise SourceError(
                f"SkyServer DR{dr} answered with a table lacking columns {missing[:5]} "
                f"(an HTML error page served with status 200?); got: {_snippet(table)!r}"
            )
        frame = table.to_pandas()
        incomplete = frame[list(expected)].isna().any(axis=1)
        if incomplete.any():
            row = int(np.flatnonzero(incomplete.to_numpy())[0])
            if junk_left[0] > 0:
                junk_left[0] -= 1
                raise RetryableError(f"incomplete CSV row {row} (truncated answer?)")
            raise SourceError(
                f"SkyServer DR{dr} answered with an incomplete CSV table (row {row} has "
                f"missing values; truncated answer?): {_snippet(table)!r}"
            )
        return frame

    try:
        result, _ = call_with_retries(
            attempt,
            what=f"SkyServer DR{dr} SQL query",
            max_retries=settings["max_retries"],
            backoff_base_s=settings["backoff_base_s"],
            backoff_max_s=settings["backoff_max_s"],
            rng=random.Random(0),
            before_attempt=limiter.acquire,
        )
    except FetchError as exc:
        raise SourceError(f"{exc}; query: {sql[:160]}...") from exc
    return result


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
        if name in ("gz2class", "spec_class"):
            out[name] = out[name].astype(str).str.strip()
        elif name in ("nvote", "spiral", "elliptical", "uncertain", "total_classifications"):
            out[name] = out[name].astype(np.int64)
        else:
            out[name] = out[name].astype(np.float64)
    out = out[[*OUTPUT_COLUMNS, *extra]]
    return out.sort_values(["label", "objid"], kind="stable").reset_index(drop=True)


def query_catalogue(
    params: Mapping[str, Any] | None, *, seed: int, bands: Sequence[str]
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Select a labelled galaxy catalogue on SkyServer.

    Parameters
    ----------
    params : mapping
        The ``sdss:`` config section (missing keys take :data:`DEFAULTS`).
        ``skyserver_url`` is applied through astroquery's own configuration
        (``astroquery.sdss.conf.skyserver_baseurl``) for the duration of the
        call.
    seed : int
        Recorded in the provenance (the selection itself is deterministic).
    bands : sequence of str
        Imaging bands of the run (validated: ugriz); all five Petrosian
        magnitudes are returned regardless.

    Returns
    -------
    catalogue : pandas.DataFrame
        One row per galaxy, sorted by ``label`` then ``objid``; columns
        :data:`OUTPUT_COLUMNS` (``objid`` int64, ``specobjid`` uint64 -- DR17
        spectrum ids exceed int64 -- ``run``/``rerun``/``camcol``/``field``
        int64, photometry float64, ``label`` str) followed by the scheme's
        label-source columns (vote fractions and flags, ``gz2class``, or
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
        Invalid settings (named key).
    SourceError
        Empty result for a class, an HTML/junk answer, an SQL error reported by
        SkyServer, or retries exhausted; the message names the DR.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ConfigError(f"seed: expected an integer, got {_show(seed)}")
    validate_bands(bands)
    dr = data_release(params)
    base = skyserver_url(params)
    scheme = label_scheme(params)
    classes = label_classes(params)
    n_per_class = _integer(params, "selection.n_per_class", 1, 10_000_000)
    settings = query_settings(params)
    # validate everything that reaches SQL before the first request
    build_queries(params)
    expected = [name for _, name in select_columns(scheme)]
    rate = settings["max_queries_per_minute"] / 60.0
    limiter = RateLimiter(rate, burst=1)
    sdss, conf, aq_version = _astroquery()
    del sdss
    sqls: list[str] = []
    stats: dict[str, int] = {}
    per_class: dict[str, pd.DataFrame] = {}
    n_dupes = 0
    started = datetime.now(UTC)
    t0 = time.monotonic()
    with conf.set_temp("skyserver_baseurl", base):
        for label in classes:
            pages: list[pd.DataFrame] = []
            seen: set[int] = set()
            last = 0
            while len(seen) < n_per_class:
                top = min(settings["page_size"], n_per_class - len(seen))
                sql = build_page_sql(params, label, top=top, after_objid=last)
                sqls.append(sql)
                page = _run_query(
                    sql,
                    dr=dr,
                    settings=settings,
                    limiter=limiter,
                    expected=expected,
                    stats=stats,
                )
                if page is None or page.empty:
                    break
                ids = page["objid"].astype(np.int64)
                dup = ids.duplicated() | ids.isin(seen)
                n_dupes += int(dup.sum())
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
                    f"SkyServer DR{dr} ({base}) returned no rows for class {label!r} of label "
                    f"scheme {scheme!r}: widen sdss.selection; first query: "
                    f"{build_page_sql(params, label, top=1)[:200]}..."
                )
            merged = pd.concat(pages, ignore_index=True).sort_values("objid", kind="stable")
            merged = merged.head(n_per_class).copy()
            merged["label"] = label
            per_class[label] = merged
    combined = pd.concat(per_class.values(), ignore_index=True)
    ids = combined["objid"].astype(np.int64)
    ambiguous = ids.duplicated(keep=False)
    n_ambiguous = int(ids[ambiguous].nunique())
    combined = combined.loc[~ambiguous.to_numpy()]
    catalogue = _finish(combined, scheme)
    provenance: dict[str, Any] = {
        "source": "sdss",
        "sql": sqls,
        "data_release": dr,
        "queried_at_utc": started.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t0, 3),
        "skyserver_url": base,
        "query_endpoint": f"{base}/dr{dr}/en/tools/search/"
        + ("x_results.aspx" if dr > 10 else ("x_sql.aspx" if dr == 10 else "x_sql.asp")),
        "astroquery_version": aq_version,
        "galpipe_version": __version__,
        "label_scheme": scheme,
        "classes": classes,
        "n_per_class": n_per_class,
        "counts": {k: int((catalogue["label"] == k).sum()) for k in classes},
        "n_queries": int(stats.get("queries", 0)),
        "n_duplicates_dropped": n_dupes,
        "n_ambiguous_dropped": n_ambiguous,
        "seed": int(seed),
        "bands": list(bands),
    }
    return catalogue, provenance
