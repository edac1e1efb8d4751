"""config/sdss.yaml through the whole workflow against the stand-in SkyServer on 127.0.0.1.

The only change to the shipped config is the address of the services (the two URLs);
the stand-in serves the SkyServer SQL endpoint, full-size SDSS frames and ImgCutout JPEGs.
Its 160 objects on two fields give 51 labelled galaxies after the selection cuts, 7 of them
(2 elliptical, 5 spiral) in the test split: enough to check that both models learned.  The sky
is the session's full-frame sky (tests/conftest.py, shared with test_sdss_cutouts), its frames
rendered before Snakemake starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from galpipe.io.cutout_fits import read_cutout
from galpipe.testing.fakeserver import FakeSkyServer

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sdss_config_runs_end_to_end_against_stand_in(tmp_path: Path, full_frame_sky: dict[str, Any]) -> None:
    with FakeSkyServer(**full_frame_sky) as srv:
        assert srv.frame_shape == (1489, 2048) and len(srv.table) == 160 and len(srv.fields) == 2
        override = json.dumps({"skyserver_url": srv.skyserver_url, "sas_url": srv.sas_url})
        cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(tmp_path),
               "--cores", "2", "--configfile", str(REPO / "config" / "sdss.yaml"), "--config", f"sdss={override}"]
        res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                             env={**os.environ, "PYTHONHASHSEED": "0"})
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
        paths = [r["path"] for r in srv.log]
    assert any("x_results" in p or "x_sql" in p for p in paths)
    assert any(p.endswith(".fits.bz2") for p in paths)
    r = tmp_path / "results" / "sdss"  # config/sdss.yaml writes to its own folder
    assert not (tmp_path / "results" / "catalogue").exists()
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
        pred = pd.read_parquet(r / "evaluation" / name / "predictions.parquet")
        y = pred["label_index"].to_numpy()
        p = pred[[f"p_{c}" for c in m["classes"]]].to_numpy()
        head = {k: v["value"] for k, v in m["headline"].items()}
        assert m["n_test"] == len(pred) == 7 and sorted(set(y)) == [0, 1], (name, len(pred))
        # the reported metrics are those of the predictions written next to them
        assert head["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(axis=1)))
        assert head["macro_auc"] == pytest.approx(np.mean([roc_auc_score(y == k, p[:, k]) for k in (0, 1)]))
        # and the models learned.  Measured: macro AUC 1.0 for both (every elliptical ranked above
        # every spiral), balanced accuracy 1.0 (catalogue_baseline) and 0.9 (small_cnn, one spiral
        # called elliptical).  A constant prediction scores 0.5 on both.  AUC >= 0.9 allows one of
        # the 10 elliptical-spiral pairs out of order; balanced accuracy >= 0.6 allows one more
        # mistake of either kind (0.65 at worst) on top of the measured ones.
        assert head["macro_auc"] >= 0.9, (name, head)
        assert head["balanced_accuracy"] >= 0.6, (name, head)
    assert (r / "leaderboard.csv").is_file()
    assert not list(tmp_path.rglob("*.tmp"))
