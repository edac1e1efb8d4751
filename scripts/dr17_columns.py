#!/usr/bin/env python3
"""Derive the DR17 column lists of the tables galpipe queries from the sqlloader schema.

The SDSS CAS schema (``CREATE TABLE`` / ``CREATE VIEW`` scripts) is published in
https://github.com/sciserver/sqlloader (``schema/sql/*.sql``).  This script reads one
commit of a local clone (or of a bare mirror: files are read with ``git show``, never
from a work tree), and writes

``galpipe/testing/dr17_columns.json``, the checked-in fixture (package data, read by
:mod:`galpipe.testing.dr17_columns` for the stand-in SkyServer and by the tests): ``source``
(repository, commit, files), ``objects`` (every table and view name the schema creates,
sorted) and ``tables`` (table -> its columns in definition order; a view -> ``view_of``).

Parsing is deliberately plain: ``/* ... */`` comments are dropped (``SpectroTables.sql``
keeps an older ``SpecObjAll`` commented out "for DR17"), then each ``CREATE TABLE name (``
body is cut at its closing parenthesis and every line that starts with an identifier
followed by a type gives a column.  A view defined as ``SELECT * FROM base`` (``PhotoObj``
on ``PhotoObjAll``, ``SpecObj`` on ``SpecObjAll``, ``Views.sql``) exposes exactly its base
table's columns, so it records ``view_of`` (the loader gives it the base table's columns).  Any other view is refused
rather than guessed.

Usage::

    python scripts/dr17_columns.py [--repo /work/.mirror/sciserver+sqlloader/repo] [--commit HEAD]
    python scripts/dr17_columns.py --check      # exit 1 if the checked-in files differ
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "galpipe" / "testing" / "dr17_columns.json"
REPOSITORY = "https://github.com/sciserver/sqlloader"
DEFAULT_REPO = Path("/work/.mirror/sciserver+sqlloader/repo")

#: The tables and views galpipe's SQL names (galpipe.sources.sdss), and their files.
WANTED: dict[str, str] = {
    "PhotoObjAll": "schema/sql/PhotoTables.sql",
    "PhotoObj": "schema/sql/Views.sql",
    "PhotoPrimary": "schema/sql/Views.sql",
    "SpecObjAll": "schema/sql/SpectroTables.sql",
    "SpecObj": "schema/sql/Views.sql",
    "zooSpec": "schema/sql/GalaxyZooTables.sql",
    "zoo2MainSpecz": "schema/sql/GalaxyZoo2Tables.sql",
}

_BLOCK_COMMENT = re.compile(r"/\*.*?\*/", re.S)
_CREATE_TABLE = re.compile(r"^\s*CREATE\s+TABLE\s+(?:\[?dbo\]?\.)?\[?(\w+)\]?\s*\(", re.I | re.M)
_CREATE_VIEW = re.compile(r"^\s*CREATE\s+VIEW\s+(?:\[?dbo\]?\.)?\[?(\w+)\]?", re.I | re.M)
_COLUMN = re.compile(r"^\s*\[?([A-Za-z_]\w*)\]?\s+\[?[A-Za-z]\w*\]?")
_NOT_COLUMNS = {"constraint", "primary", "foreign", "unique", "check", "index"}


def git_show(repo: Path, commit: str, path: str) -> str:
    """The text of ``path`` at ``commit`` of the git repository ``repo``."""
    return subprocess.run(["git", "-C", str(repo), "show", f"{commit}:{path}"], check=True,
                          capture_output=True, text=True, encoding="utf-8", errors="replace").stdout


def strip_comments(sql: str) -> str:
    """``sql`` without ``/* */`` blocks (line comments are dropped per line later)."""
    return _BLOCK_COMMENT.sub(" ", sql)


def table_columns(sql: str, name: str) -> list[str]:
    """Columns of ``CREATE TABLE name`` in ``sql`` (comments removed), in order.

    Raises
    ------
    ValueError
        The table is defined zero or several times.
    """
    starts = [m for m in _CREATE_TABLE.finditer(sql) if m.group(1).lower() == name.lower()]
    if len(starts) != 1:
        raise ValueError(f"CREATE TABLE {name}: found {len(starts)} definitions")
    body, depth = [], 1
    for ch in sql[starts[0].end():]:
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            break
        body.append(ch)
    columns: list[str] = []
    for line in "".join(body).splitlines():
        code = line.split("--", 1)[0]
        m = _COLUMN.match(code)
        if m and m.group(1).lower() not in _NOT_COLUMNS:
            columns.append(m.group(1))
    if len({c.lower() for c in columns}) != len(columns):
        raise ValueError(f"CREATE TABLE {name}: duplicate column names")
    return columns


def view_base(sql: str, name: str) -> str:
    """The base table of ``CREATE VIEW name ... AS SELECT * FROM base [WITH(NOLOCK)] [WHERE ...]``.

    Raises
    ------
    ValueError
        The view is missing, defined twice, or selects anything but ``*`` from one table.
    """
    starts = [m for m in _CREATE_VIEW.finditer(sql) if m.group(1).lower() == name.lower()]
    if len(starts) != 1:
        raise ValueError(f"CREATE VIEW {name}: found {len(starts)} definitions")
    text = sql[starts[0].end():]
    text = text[: re.search(r"^\s*GO\s*$", text, re.M | re.I).start()]  # type: ignore[union-attr]
    code = " ".join(line.split("--", 1)[0] for line in text.splitlines())
    m = re.fullmatch(r"\s*AS\s+SELECT\s+\*\s+FROM\s+(\w+)(?:\s+WITH\s*\(\s*NOLOCK\s*\))?(?:\s+WHERE\s+.*)?", code,
                     re.I | re.S)
    if not m:
        raise ValueError(f"CREATE VIEW {name} is not SELECT * FROM one table: {' '.join(code.split())[:120]!r}")
    return m.group(1)


def all_objects(repo: Path, commit: str) -> list[str]:
    """Every table and view name created by ``schema/sql/*.sql`` (sorted, case-insensitively unique)."""
    names = subprocess.run(["git", "-C", str(repo), "ls-tree", "--name-only", commit, "schema/sql/"],
                           check=True, capture_output=True, text=True).stdout.split()
    found: dict[str, str] = {}
    for path in names:
        if not path.endswith(".sql"):
            continue
        sql = strip_comments(git_show(repo, commit, path))
        for pattern in (_CREATE_TABLE, _CREATE_VIEW):
            for m in pattern.finditer(sql):
                found.setdefault(m.group(1).lower(), m.group(1))
    return sorted(found.values(), key=str.lower)


def build(repo: Path, commit: str) -> dict[str, object]:
    """The fixture: ``source``, ``objects`` and ``tables`` (see the module docstring)."""
    full = subprocess.run(["git", "-C", str(repo), "rev-parse", commit], check=True, capture_output=True,
                          text=True).stdout.strip()
    texts = {path: strip_comments(git_show(repo, full, path)) for path in sorted(set(WANTED.values()))}
    tables: dict[str, dict[str, object]] = {}
    for name, path in WANTED.items():
        if re.search(rf"^\s*CREATE\s+VIEW\s+{name}\b", texts[path], re.I | re.M):
            base = view_base(texts[path], name)
            base_key = next(k for k in WANTED if k.lower() == base.lower())
            table_columns(texts[WANTED[base_key]], base_key)  # the base table must parse
            tables[name] = {"file": path, "view_of": base_key}
        else:
            tables[name] = {"file": path, "columns": table_columns(texts[path], name)}
    return {
        "source": {
            "repository": REPOSITORY,
            "commit": full,
            "files": sorted(set(WANTED.values())),
            "generator": "scripts/dr17_columns.py",
        },
        "objects": all_objects(repo, full),
        "tables": tables,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=DEFAULT_REPO, help="clone or bare mirror of sciserver/sqlloader")
    parser.add_argument("--commit", default="HEAD")
    parser.add_argument("--check", action="store_true", help="compare with the checked-in files, write nothing")
    args = parser.parse_args(argv)
    data = build(args.repo, args.commit)
    fixture = json.dumps(data, indent=1) + "\n"
    if args.check:
        if not FIXTURE.exists() or FIXTURE.read_text() != fixture:
            print(f"out of date: {FIXTURE}", file=sys.stderr)
            return 1
        return 0
    tmp = FIXTURE.with_suffix(".json.tmp")
    tmp.write_text(fixture)
    tmp.replace(FIXTURE)
    print(f"wrote {FIXTURE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
