"""config/sdss.yaml through the whole workflow against the stand-in SkyServer on 127.0.0.1.

The only change to the shipped config is the address of the services (the two URLs);
the stand-in serves the SkyServer SQL endpoint, full-size SDSS frames and ImgCutout JPEGs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from galpipe.io import read_cutout
from galpipe.sources.fakeserver import FakeSkyServer

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sdss_config_runs_end_to_end_against_stand_in(tmp_path: Path) -> None:
    with FakeSkyServer(n_galaxies=48, seed=3, frame_shape=(1489, 2048), galaxies_per_field=24) as srv:
        override = json.dumps({"skyserver_url": srv.skyserver_url, "sas_url": srv.sas_url})
        cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(tmp_path),
               "--cores", "2", "--configfile", str(REPO / "config" / "sdss.yaml"), "--config", f"sdss={override}"]
        (tmp_path / "config").mkdir()
        (tmp_path / "config" / "config.yaml").write_text((REPO / "config" / "sdss.yaml").read_text())
        res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                             env={**os.environ, "PYTHONHASHSEED": "0"})
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
        paths = [r["path"] for r in srv.log]
    assert any("x_results" in p or "x_sql" in p for p in paths)
    assert any(p.endswith(".fits.bz2") for p in paths)
    r = tmp_path / "results"
    cat = pd.read_parquet(r / "catalogue" / "catalogue.parquet")
    assert {"run", "rerun", "camcol", "field", "petroR90_r", "fracDeV_r"} <= set(cat.columns)
    assert set(cat["label"]) == {"elliptical", "spiral"}
    man = pd.concat([pd.read_parquet(p) for p in sorted((r / "cutouts").glob("*.parquet"))])
    ok = man[man["status"] == "ok"]
    assert len(ok) >= 0.9 * len(cat)
    c = read_cutout(tmp_path / ok["path"].iloc[0], bands=["g", "r", "i"])
    assert c.data.shape == (3, 64, 64) and c.bunit == "nanomaggy" and c.header["SOURCE"] == "sdss"
    for name in ("small_cnn", "catalogue_baseline"):
        m = json.loads((r / "evaluation" / name / "metrics.json").read_text())
        assert 0.0 <= m["headline"]["balanced_accuracy"]["value"] <= 1.0
    assert (r / "leaderboard.csv").is_file()
    assert not list(tmp_path.rglob("*.tmp"))
