"""The report's data page: class counts per split, provenance, the SQL sent (escaped)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from galpipe.io.parquet import write_table
from galpipe.stages.leaderboard import dataset_html, dataset_summary


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    cat = tmp_path / "catalogue.parquet"
    df = pd.DataFrame({"objid": [1, 2, 3, 4, 5], "label": ["spiral", "spiral", "elliptical", "spiral", "elliptical"]})
    prov = {"source": "sdss", "data_release": 17, "label_scheme": "gz1_flags",
            "query_endpoint": "https://skyserver.sdss.org/dr17/en/tools/search/x_results.aspx",
            "sql": ["SELECT TOP 2 p.objid FROM ZooSpec AS z WHERE p.objid > 0 AND z.p_el < 0.5 -- <script>"],
            "counts": {"spiral": 3, "elliptical": 2}}
    write_table(df, cat, {"provenance": prov})
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"classes": ["elliptical", "spiral"], "n": 4,
                                   "counts": {"train": {"elliptical": 1, "spiral": 1},
                                              "validation": {"spiral": 1}, "test": {"elliptical": 1}}}))
    return cat, summary


def test_summary_counts_and_rejects(tmp_path: Path) -> None:
    info = dataset_summary(*_inputs(tmp_path))
    assert info["counts"]["elliptical"] == {"train": 1, "validation": 0, "test": 1, "total": 2}
    assert info["counts"]["total"] == {"train": 2, "validation": 1, "test": 1, "total": 4}
    assert (info["n_catalogue"], info["n_split"]) == (5, 4)
    assert len(info["sql"]) == 1 and "sql" not in info["provenance"]


def test_page_shows_provenance_and_escapes_the_sql(tmp_path: Path) -> None:
    html = dataset_html(*_inputs(tmp_path))
    assert "<th>SDSS data release</th><td>17</td>" in html
    assert "1 rejected by the cutouts or normalise stage" in html
    assert "<script>" not in html and "z.p_el &lt; 0.5 -- &lt;script&gt;" in html
    assert re.search(r"SQL sent to SkyServer \(1 statement\)", html)
