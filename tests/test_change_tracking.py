"""A truthful cache: when an input a result depends on changes, exactly the affected jobs rerun.

One tiny workflow on a folder of labelled JPEGs (the ``images`` source, 2 shards,
two experiments, one of them from a preset in the config's own ``architectures/``
folder) is run once; then one thing at a time is changed and the jobs Snakemake
plans are checked, and the change is followed into the outputs (the tests build on
each other's state, in file order; each plan comes from one dry run):

* a relabelled galaxy reruns the catalogue and everything after it, and the new
  label reaches the split;
* a replaced image reruns only its shard's cutouts and normalisation (and what
  follows), and the new pixels reach the split — even with ``--forceall`` (the run
  that follows the change) the old cutout is not reused;
* an edited preset reruns only the experiment that uses it;
* a code change reruns the stages whose code changed (``code_digest``);
* ``--configfile`` with another config schedules only that config's experiments,
  writing to ``results/<name>/``, and leaves the default config's results alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from galpipe.provenance import code_digest
from galpipe.stages.normalise import read_images

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 24
ARCH = [{"type": "conv2d", "filters": 2}, "relu", "global_avg_pool"]


def _jpeg(path: Path, kind: str, seed: int) -> None:
    """A 24x24 colour JPEG: a round blob (E) or a thin streak (S)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:24, :24] - 11.5
    r2 = (xx**2 + yy**2) / 20 if kind == "E" else (xx**2 / 60 + yy**2 / 2)
    img = np.clip(200 * np.exp(-r2)[..., None] * [1.0, 0.8, 0.6] + rng.normal(0, 3, (24, 24, 3)), 0, 255)
    Image.fromarray(img.astype(np.uint8)).save(path, quality=95)


def _config(workdir: Path) -> dict:
    return {
        "source": "images", "seed": 3, "cutout_size": 16, "shards": 2, "max_reject_fraction": 0.0,
        "images": {"directory": str(workdir / "data"), "labels_csv": str(workdir / "data" / "labels.csv"),
                   "label_map": {"E": "elliptical", "S": "spiral"}},
        "split": {"row_group_size": 8},
        "training": {"epochs": 1, "batch_size": 8, "early_stopping_patience": 0, "augment": False},
        "experiments": {"inline": {"architecture": ARCH}, "preset": {"architecture": "tiny_local"}},
        "evaluate": {"n_bootstrap": 5, "gallery_size": 2, "tta": False},
    }


def smk(workdir: Path, *args: str, configfile: str = "config/config.yaml") -> str:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(workdir),
           "--cores", "2", "--configfile", str(workdir / configfile), *args]
    res = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONHASHSEED": "0"})
    if res.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res.stdout + res.stderr


def jobs_in(out: str) -> dict[str, int]:
    """Jobs per rule in a dry run's output (its "Job stats" table; ``all`` left out)."""
    if "Nothing to be done" in out:
        return {}
    block = out.split("Job stats:")[-1]
    jobs = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, re.M)}
    jobs.pop("total", None)
    jobs.pop("all", None)
    return jobs


def planned(workdir: Path, *args: str, configfile: str = "config/config.yaml") -> dict[str, int]:
    """Jobs a dry run would execute, per rule."""
    return jobs_in(smk(workdir, "-n", *args, configfile=configfile))


def shards_in(out: str, rule: str) -> set[str]:
    """The ``shard`` wildcards of ``rule``'s jobs in a dry run's output."""
    found = set()
    for block in out.split("\n\n"):
        if re.search(rf"^(local)?rule {rule}:", block.strip(), re.M):
            m = re.search(r"wildcards: shard=(\d{4})", block)
            if m:
                found.add(m.group(1))
    return found


@pytest.fixture(scope="module")
def wd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wd = tmp_path_factory.mktemp("tracking")
    data = wd / "data"
    data.mkdir()
    rows = []
    for i in range(N_IMAGES):
        kind = "ES"[i % 2]
        _jpeg(data / f"g{i}.jpg", kind, seed=i)
        rows.append(f"{100 + i},{kind},g{i}.jpg")
    (data / "labels.csv").write_text("objid,label,image\n" + "\n".join(rows) + "\n")
    (wd / "config" / "architectures").mkdir(parents=True)
    (wd / "config" / "config.yaml").write_text(yaml.safe_dump(_config(wd)))
    (wd / "config" / "architectures" / "tiny_local.yaml").write_text(yaml.safe_dump(
        {"description": "a local preset", "architecture": ARCH}))
    smk(wd)
    assert planned(wd) == {}
    return wd


def _split_rows(wd: Path, results: str = "results") -> pd.DataFrame:
    frames = []
    for s in ("train", "validation", "test"):
        images, rows = read_images(wd / results / "split" / f"{s}.parquet")
        rows["image"] = list(images)
        frames.append(rows)
    return pd.concat(frames).set_index("objid")


def test_a_relabelled_galaxy_reruns_from_the_catalogue_and_reaches_the_split(wd: Path) -> None:
    csv = wd / "data" / "labels.csv"
    old = csv.read_text()
    csv.write_text(old.replace("100,E,g0.jpg", "100,S,g0.jpg"))
    jobs = planned(wd)
    assert jobs["catalogue"] == 1 and jobs["split"] == 1 and jobs["train"] == 2 and jobs["evaluate"] == 2
    smk(wd, "--until", "split")  # the next test's --forceall run trains and evaluates
    assert _split_rows(wd).loc[100, "label"] == "spiral"
    # up to the split everything is current; exactly what --until held back is left
    assert planned(wd) == {"train": 2, "evaluate": 2, "leaderboard": 1}


def test_a_replaced_image_reruns_only_its_shard_and_its_pixels_reach_the_split(wd: Path) -> None:
    from galpipe.catalogue import read_catalogue

    shards = {s: set(read_catalogue(wd / "results" / "catalogue" / "shards" / f"{s}.parquet")["objid"])
              for s in ("0000", "0001")}
    objid = 105
    shard = next(s for s, ids in shards.items() if objid in ids)
    before = _split_rows(wd).loc[objid, "image"]
    _jpeg(wd / "data" / f"g{objid - 100}.jpg", "E", seed=999)  # same name, other pixels
    out = smk(wd, "-n")
    assert shards_in(out, "cutouts") == {shard} and shards_in(out, "normalise") == {shard}, out
    jobs = jobs_in(out)
    assert jobs.get("catalogue") is None and jobs["cutouts"] == 1 and jobs["normalise"] == 1
    # --forceall redoes every job (the cached cutouts of both shards are offered for reuse),
    # and still makes this galaxy's cutout from the current file
    smk(wd, "--forceall")
    after = _split_rows(wd).loc[objid, "image"]
    assert not np.array_equal(before, after)
    assert planned(wd) == {}


def test_an_edited_preset_reruns_only_its_experiment(wd: Path) -> None:
    preset = wd / "config" / "architectures" / "tiny_local.yaml"
    preset.write_text(yaml.safe_dump({"description": "a local preset, wider",
                                      "architecture": [{"type": "conv2d", "filters": 3}, "relu", "global_avg_pool"]}))
    out = smk(wd, "-n")
    jobs = jobs_in(out)
    assert jobs == {"train": 1, "evaluate": 1, "leaderboard": 1}, out
    assert "wildcards: experiment=preset" in out and "wildcards: experiment=inline" not in out
    smk(wd)
    model = json.loads((wd / "results/models/preset/model.json").read_text())
    assert model["metadata"]["description"].endswith("wider")


def test_code_digest_follows_the_code_a_stage_runs(tmp_path: Path) -> None:
    """The rule README states: a stage reruns when a galpipe module it imports (transitively) changes."""
    pkg = tmp_path / "galpipe"
    shutil.copytree(REPO / "galpipe", pkg, ignore=shutil.ignore_patterns("__pycache__"))

    def digests() -> dict[str, str]:
        code_digest.cache_clear()
        return {s: code_digest((f"galpipe.stages.{s}", "galpipe.smk"), pkg)
                for s in ("catalogue", "normalise", "split", "train", "evaluate")}

    base = digests()
    (pkg / "nn" / "conv.py").write_text((pkg / "nn" / "conv.py").read_text() + "\n# changed\n")
    after_nn = digests()
    assert {s for s in base if base[s] != after_nn[s]} == {"train", "evaluate"}
    (pkg / "stages" / "normalise.py").write_text((pkg / "stages" / "normalise.py").read_text() + "\n# changed\n")
    after_split = digests()
    assert {s for s in base if after_nn[s] != after_split[s]} == {"normalise"}  # its outputs then rerun the rest
    (pkg / "metrics.py").write_text((pkg / "metrics.py").read_text() + "\n# changed\n")
    assert {s for s in base if after_split[s] != digests()[s]} == {"evaluate"}
    after_split = digests()
    (pkg / "schemas" / "config.schema.yaml").write_text(
        (pkg / "schemas" / "config.schema.yaml").read_text() + "\n# changed\n")
    after_schema = digests()
    assert all(after_split[s] != after_schema[s] for s in base)  # every stage reads the schema
    code_digest.cache_clear()


def test_another_config_stands_alone_and_writes_to_its_own_folder(wd: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in (wd / "results").rglob("*") if p.is_file()}
    other = _config(wd)
    other["experiments"] = {"solo": {"architecture": ARCH}}
    other["shards"] = 1
    (wd / "config" / "other.yaml").write_text(yaml.safe_dump(other))
    out = smk(wd, "-n", configfile="config/other.yaml")
    assert "results/other/models/solo/model.json" in out
    assert "models/inline" not in out and "models/preset" not in out
    assert jobs_in(out)["train"] == 1 and jobs_in(out)["catalogue"] == 1
    smk(wd, configfile="config/other.yaml")
    assert (wd / "results" / "other" / "leaderboard.csv").is_file()
    assert set(pd.read_csv(wd / "results" / "other" / "leaderboard.csv")["experiment"]) == {"solo"}
    assert (wd / "logs" / "other" / "catalogue.log").is_file()
    unchanged = {p: p.stat().st_mtime_ns for p in before}
    assert unchanged == before  # the default config's results are untouched
    assert planned(wd) == {}  # and still up to date
    # validate-config agrees on what will run
    res = subprocess.run([sys.executable, "-m", "galpipe.cli", "validate-config", "--config",
                          str(wd / "config" / "other.yaml")], capture_output=True, text=True, cwd=wd, timeout=120)
    assert res.returncode == 0 and "1 experiment(s): solo" in res.stdout


def test_models_and_metrics_record_their_provenance(wd: Path) -> None:
    model = json.loads((wd / "results/models/inline/model.json").read_text())["metadata"]
    metrics = json.loads((wd / "results/evaluation/inline/metrics.json").read_text())
    for prov in (model["provenance"], metrics["provenance"]):
        assert set(prov) >= {"galpipe_version", "code_digest", "config_digest", "data_digest", "environment"}
        env = prov["environment"]
        assert env["numpy"] and env["galpipe_workers"] >= 1 and env["blas"][0]["internal_api"]
    assert metrics["provenance"]["model"] == model["provenance"]


def test_blas_record_does_not_depend_on_what_was_imported_before() -> None:
    """The provenance's BLAS entry is NumPy's own library: loading SciPy's copy later in the same
    process (as the framing measurement does during training) must not change it, or two
    identical trainings in one process would write different model.json files."""
    import subprocess
    import sys

    code = ("from galpipe.provenance import environment\n"
            "a = environment()['blas']\n"
            "import scipy.linalg, scipy.ndimage\n"
            "scipy.linalg.inv([[2.0, 0.0], [0.0, 1.0]])\n"
            "b = environment()['blas']\n"
            "assert a == b, (a, b)\n"
            "assert a and a[0]['internal_api'], a\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
