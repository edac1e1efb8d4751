"""The whole Snakemake workflow on a tiny simulated configuration.

Runs catalogue -> cutouts -> normalise -> split -> train -> evaluate ->
leaderboard on the `.test/` config (the session's uninterrupted reference run,
shared with test_kill and test_determinism: ``robust_fixtures.reference_run``),
then checks reruns: nothing to do when nothing changed, only train/evaluate after
a training change, from normalise on after a normalisation change (dry runs of a
changed config, the reference's own config restored afterwards); and that a
malformed config fails before any job.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from robust_fixtures import ROBUST_TINY, TEST_CONFIG, reference_run, workflow_env, write_config

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

#: The `.test/` config (snakemake-workflows convention): the smallest complete run.
TINY = ROBUST_TINY


def smk(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = workflow_env()  # the reference run's environment (thread counts, PYTHONHASHSEED=0)
    cmd = [*SNAKEMAKE, "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(workdir), "--cores", "2",
           "--configfile", str(workdir / "config" / "config.yaml"), *args]
    res = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"snakemake failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}")
    return res


def planned_jobs(workdir: Path) -> dict[str, int]:
    """Jobs per rule that a dry run of ``workdir``'s config would execute (its "Job stats")."""
    out = smk(workdir, "-n").stdout
    stats: dict[str, int] = {}
    block = out.split("Job stats:")[-1] if "Job stats:" in out else ""
    for line in block.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m.group(1) != "total":
            stats[m.group(1)] = int(m.group(2))
    return stats


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's uninterrupted run of the `.test/` config (outputs must stay untouched)."""
    wd, _ = reference_run(tmp_path_factory)
    ran = yaml.safe_load((wd / "config" / "config.yaml").read_text(encoding="utf-8"))
    assert ran == yaml.safe_load(TEST_CONFIG.read_text(encoding="utf-8")), "the shared run is not .test's config"
    return wd


def test_full_run_produces_every_artifact(run_dir: Path) -> None:
    r = run_dir / "results"
    for p in ["catalogue/catalogue.parquet", "catalogue/shards/0000.parquet", "catalogue/shards/0001.parquet",
              "cutouts/0000.parquet", "normalised/0001.parquet", "split/train.parquet", "split/test.parquet",
              "models/tiny_cnn/model.json", "models/tiny_cnn/weights.npz", "models/baseline/history.csv",
              "evaluation/tiny_cnn/metrics.json", "evaluation/tiny_cnn/figures/confusion_matrix.png",
              "evaluation/tiny_cnn/figures/learning_curves.png", "evaluation/baseline/metrics.json",
              "leaderboard.csv", "comparison.png"]:
        assert (r / p).is_file(), p
    m = json.loads((r / "evaluation/tiny_cnn/metrics.json").read_text())
    assert set(m["headline"]) >= {"accuracy", "balanced_accuracy", "macro_f1"}
    assert len(m["plain"]["confusion_matrix"]) == 3
    lb = pd.read_csv(r / "leaderboard.csv")
    assert set(lb["experiment"]) == {"tiny_cnn", "baseline"}
    assert (run_dir / "logs" / "catalogue.log").is_file()
    assert (run_dir / "logs" / "benchmarks" / "split.tsv").is_file()
    cutouts = list((run_dir / "resources" / "cutouts").glob("simulated-*/*.fits"))
    assert len(cutouts) == 90
    leftovers = [p for p in run_dir.rglob("*.tmp")]
    assert not leftovers


def test_rerun_does_nothing(run_dir: Path) -> None:
    res = smk(run_dir)
    assert "Nothing to be done" in res.stdout + res.stderr


def test_training_change_reruns_only_train_and_evaluate(run_dir: Path) -> None:
    cfg = json.loads(json.dumps(TINY))
    cfg["training"]["lr"] = 0.003
    write_config(run_dir, cfg)
    try:
        jobs = planned_jobs(run_dir)
    finally:
        write_config(run_dir, TINY)
    assert set(jobs) == {"train", "evaluate", "leaderboard", "all"} or set(jobs) == {"train", "evaluate", "leaderboard"}
    assert jobs["train"] == 2


def test_normalise_change_reruns_from_normalise(run_dir: Path) -> None:
    cfg = json.loads(json.dumps(TINY))
    cfg["normalise"] = {"softening": 0.2}
    write_config(run_dir, cfg)
    try:
        jobs = planned_jobs(run_dir)
    finally:
        write_config(run_dir, TINY)
    assert "catalogue" not in jobs and "cutouts" not in jobs
    assert jobs["normalise"] == 2 and jobs["split"] == 1 and jobs["train"] == 2


def test_bad_config_fails_before_any_job(tmp_path: Path) -> None:
    cfg = json.loads(json.dumps(TINY))
    cfg["split"] = {"fractions": {"train": 2.0}}
    write_config(tmp_path, cfg)
    res = smk(tmp_path, check=False)
    assert res.returncode != 0
    assert "split.fractions.train" in res.stdout + res.stderr
    assert not (tmp_path / "results").exists()


def test_bad_architecture_fails_naming_the_layer(tmp_path: Path) -> None:
    cfg = json.loads(json.dumps(TINY))
    cfg["experiments"] = {"broken": {"architecture": [{"type": "conv2d", "filters": 4, "kernel_size": 64,
                                                       "padding": "valid"}, "flatten"]}}
    write_config(tmp_path, cfg)
    res = smk(tmp_path, check=False)
    assert res.returncode != 0
    assert "experiments.broken.architecture" in res.stdout + res.stderr
    assert not (tmp_path / "results").exists()


def test_lint_is_clean() -> None:
    res = subprocess.run([*SNAKEMAKE, "--lint", "-s", str(REPO / "workflow" / "Snakefile"),
                          "--configfile", str(REPO / "config" / "config.yaml")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Lints for" not in res.stdout + res.stderr, res.stdout + res.stderr


def test_adding_an_experiment_trains_only_that_one(run_dir: Path) -> None:
    cfg = json.loads(json.dumps(TINY))
    cfg["experiments"]["third"] = {"architecture": [{"type": "conv2d", "filters": 2}, "relu", "global_avg_pool"]}
    write_config(run_dir, cfg)
    try:
        jobs = planned_jobs(run_dir)
    finally:
        write_config(run_dir, TINY)
    assert jobs.get("train") == 1 and jobs.get("evaluate") == 1
    assert "split" not in jobs and "normalise" not in jobs and "catalogue" not in jobs
