"""The real galpipe workflow through SLURM, compared with a local run of the same config.

A tiny simulated survey (90 galaxies, 32x32 g/r/i, 2 shards, a 4-filter CNN and the
catalogue-feature baseline, 2 epochs) runs twice at the same time:

* through ``--workflow-profile profiles/slurm``: every rule instance (catalogue, 2 cutouts,
  2 normalise, split, 2 train, 2 evaluate, leaderboard) is its own ``sbatch`` job on the
  one-node cluster of ``scripts/slurm/start.sh``; Snakemake itself is started outside any
  SLURM job (``SLURM_*`` variables removed) and wrapped in ``timeout -k``;
* locally with ``--cores 2``.

Every artifact under ``results/`` and ``resources/`` must then be byte-identical, except
the wall-clock times (``seconds`` in history.csv, ``train_seconds`` in train_info.json and
leaderboard.csv, the "training time" column of leaderboard.html), which are compared with
those fields removed.  Training is deterministic
only for a fixed BLAS thread count: ``train`` and ``evaluate`` declare ``threads: 2``, which
becomes ``--cpus-per-task=2`` under SLURM (the job's Snakemake then runs the rule with 2
threads) and stays 2 locally with ``--cores 2``; ``galpipe.smk.run_stage`` limits BLAS to the
rule's threads in both cases.  The test checks that both logs report ``threads: 2``.

Needs the cluster and the executor plugin; skips with the reason otherwise, fails instead
when ``GALPIPE_REQUIRE_SLURM=1``.  About 3 minutes (SLURM polling dominates).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from robust_fixtures import ROBUST_TINY
from test_slurm import PARTITION, _cancel_jobs_in, _job_fields, _slurm_unavailable, _submit_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
SLURM_PROFILE = REPO / "profiles" / "slurm"
#: Hard limit for the SLURM run (seconds); it takes 3.5-4 minutes on 2 cores shared with the other
#: pytest-xdist worker (and MinJobAge=600 of the test cluster keeps the job records that long).
SLURM_LIMIT_S = 600
#: Hard limit for the local run (seconds); it takes under a minute.
LOCAL_LIMIT_S = 480

#: The tiny simulated workflow shared with the robustness tests.
CONFIG = ROBUST_TINY

#: (rule, wildcards path) of every job the config makes; each must be its own sbatch job.
EXPECTED_JOBS = {
    ("catalogue", ""),
    ("cutouts", "0000"), ("cutouts", "0001"),
    ("normalise", "0000"), ("normalise", "0001"),
    ("split", ""),
    ("train", "baseline"), ("train", "tiny_cnn"),
    ("evaluate", "baseline"), ("evaluate", "tiny_cnn"),
    ("leaderboard", ""),
}  # fmt: skip

#: Artifacts the comparison must cover (relative to the work directory).
REQUIRED_ARTIFACTS = [
    "results/catalogue/catalogue.parquet",
    "results/catalogue/shards/0000.parquet",
    "results/catalogue/shards/0001.parquet",
    "results/cutouts/0000.parquet",
    "results/cutouts/0001.parquet",
    "results/normalised/0000.parquet",
    "results/normalised/0001.parquet",
    "results/split/train.parquet",
    "results/split/validation.parquet",
    "results/split/test.parquet",
    "results/models/tiny_cnn/weights.npz",
    "results/models/baseline/weights.npz",
    "results/evaluation/tiny_cnn/metrics.json",
    "results/evaluation/baseline/metrics.json",
]

SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")
#: A job block of Snakemake's log: "rule NAME:" and its indented "key: value" lines.
JOB_BLOCK = re.compile(r"^(?:local)?rule (\w+):\n((?:[ \t]+\S.*\n)+)", re.MULTILINE)


@dataclass(frozen=True)
class Run:
    """Outcome of one bounded Snakemake run of CONFIG."""

    workdir: Path
    returncode: int
    log: str


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    """Skip (or fail, with GALPIPE_REQUIRE_SLURM=1) unless the local cluster is usable."""
    reason = _slurm_unavailable()
    if reason is None:
        return
    if os.environ.get("GALPIPE_REQUIRE_SLURM") == "1":
        pytest.fail(f"GALPIPE_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def _command(workdir: Path, limit_s: int, *extra: str) -> list[str]:
    """Snakemake on the galpipe workflow in ``workdir``, killed after ``limit_s`` seconds."""
    return [
        "timeout", "-k", "10", str(limit_s),
        sys.executable, "-m", "snakemake",
        "-s", str(SNAKEFILE),
        "-d", str(workdir),
        "--configfile", str(workdir / "config" / "config.yaml"),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(slurm_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """The SLURM run and the local run of CONFIG, started together (their output to files)."""
    env = {**_submit_env(), "PYTHONHASHSEED": "0"}
    specs = {
        "slurm": (SLURM_LIMIT_S, ("--workflow-profile", str(SLURM_PROFILE))),
        "local": (LOCAL_LIMIT_S, ("--workflow-profile", "none", "--cores", "2")),
    }
    started: dict[str, tuple[Path, int, subprocess.Popen[bytes]]] = {}
    try:
        for name, (limit, extra) in specs.items():
            workdir = tmp_path_factory.mktemp(f"pipeline_{name}")
            (workdir / "config").mkdir()
            (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(CONFIG))
            with open(workdir / "snakemake.out", "wb") as out:
                proc = subprocess.Popen(_command(workdir, limit, *extra), cwd=workdir, env=env,
                                        stdout=out, stderr=out)
            started[name] = (workdir, limit, proc)
        result = {}
        for name, (workdir, limit, proc) in started.items():
            returncode = proc.wait(timeout=limit + 30)
            result[name] = Run(workdir, returncode, (workdir / "snakemake.out").read_text(errors="replace"))
    finally:
        for _, _, proc in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if "slurm" in started:
            _cancel_jobs_in(started["slurm"][0])
    for name, run in result.items():
        assert run.returncode != 124, f"{name} snakemake run hit its time limit:\n{run.log[-4000:]}"
        assert run.returncode == 0, f"{name} snakemake run failed:\n{run.log[-4000:]}"
    return result


@dataclass(frozen=True)
class Job:
    """One job as Snakemake printed it: rule, wildcards path, threads and mem_mb."""

    rule: str
    wildcards: str
    threads: int
    mem_mb: int


def _job_blocks(log: str) -> dict[str, Job]:
    """Snakemake job id -> the job's rule, wildcards, threads and mem_mb, from a Snakemake log."""
    jobs = {}
    for rule, body in JOB_BLOCK.findall(log):
        fields = dict(re.findall(r"^\s+(\w+): (.*)$", body, re.MULTILINE))
        mem = re.search(r"\bmem_mb=(\d+)", fields.get("resources", ""))
        wildcards = "/".join(w.split("=", 1)[1] for w in fields.get("wildcards", "").split(", ") if w)
        jobs[fields["jobid"]] = Job(rule, wildcards, int(fields.get("threads", 1)),
                                    int(mem.group(1)) if mem else 0)
    return jobs


def _submitted_jobs(run: Run) -> dict[tuple[str, str], tuple[str, Path, Job]]:
    """(rule, wildcards) -> (SLURM job id, plugin log, job) from the submitting Snakemake's log."""
    logdir = run.workdir / ".snakemake" / "slurm_logs"
    blocks = _job_blocks(run.log)
    jobs: dict[tuple[str, str], tuple[str, Path, Job]] = {}
    for smk_id, job_id, log in SUBMITTED.findall(run.log):
        job = blocks[smk_id]
        key = (job.rule, job.wildcards)
        assert key not in jobs, f"{key} submitted twice: {jobs[key][0]} and {job_id}"
        # The plugin names the log rule_<rule>/<wildcards>/<SLURM job id>.log.
        assert Path(log) == logdir.joinpath(f"rule_{job.rule}", job.wildcards, f"{job_id}.log"), log
        jobs[key] = (job_id, Path(log), job)
    return jobs


def test_every_rule_runs_as_its_own_sbatch_job(runs: dict[str, Run]) -> None:
    run = runs["slurm"]
    jobs = _submitted_jobs(run)
    assert set(jobs) == EXPECTED_JOBS, jobs
    job_ids = {key: job_id for key, (job_id, _, _) in jobs.items()}
    assert len(set(job_ids.values())) == len(EXPECTED_JOBS), job_ids

    for (rule, wildcards), (_, log, _) in jobs.items():
        text = log.read_text(errors="replace")
        # The plugin's log of the job: inside the allocation a job-step Snakemake ran exactly this
        # rule instance as a local rule. (Only the start-up banner, which some Snakemake 9
        # releases print and others do not, names the jobstep executor, so it is not relied on.)
        assert re.search(rf"^localrule {rule}:$", text, re.MULTILINE), log
        inner = [j for j in _job_blocks(text).values() if j.rule == rule]
        assert inner and {(j.wildcards, j.threads) for j in inner} == {(wildcards, jobs[rule, wildcards][2].threads)}
        assert re.search(rf"Finished jobid: \d+ \(Rule: {rule}\)", text), log

    # SLURM saw one completed job per rule instance, all of this run, with the rule's threads
    # as CPUs and its mem_mb as memory.
    fields = _job_fields(list(job_ids.values()))
    assert set(fields) == set(job_ids.values()), fields
    assert {f["state"] for f in fields.values()} == {"COMPLETED"}, fields
    assert {f["partition"] for f in fields.values()} == {PARTITION}, fields
    run_id = re.search(r"SLURM run ID: (\S+)", run.log)
    assert run_id, run.log[-4000:]
    assert {f["name"] for f in fields.values()} == {run_id.group(1)}, fields
    for key, (job_id, _, job) in jobs.items():
        assert (fields[job_id]["cpus"], fields[job_id]["mem"]) == (str(job.threads), f"{job.mem_mb}M"), key

    # Training and evaluation ran with 2 threads in both runs (same BLAS thread count).
    local = {(j.rule, j.wildcards): j.threads for j in _job_blocks(runs["local"].log).values()}
    for key in [k for k in EXPECTED_JOBS if k[0] in ("train", "evaluate")]:
        assert jobs[key][2].threads == local[key] == 2, (key, jobs[key][2], local.get(key))


def _artifacts(workdir: Path) -> set[str]:
    return {
        p.relative_to(workdir).as_posix()
        for top in ("results", "resources")
        for p in (workdir / top).rglob("*")
        if p.is_file()
    }


#: Wall-clock fields: file name -> CSV column / JSON key / HTML table header holding a time.
TIMED_FIELDS = {
    "history.csv": "seconds",
    "leaderboard.csv": "train_seconds",
    "train_info.json": "train_seconds",
    "leaderboard.html": "training time (s)",
}


def _without_times(rel: str, data: bytes) -> bytes | None:
    """``data`` with its wall-clock field removed, or None when the file has none."""
    name = rel.rsplit("/", 1)[-1]
    if name.endswith(".fits"):  # cutouts: DATE and the checksums that quote it
        from galpipe.io.cutout_fits import stable_fits_bytes

        return stable_fits_bytes(data)
    key = TIMED_FIELDS.get(name)
    if key is None:
        return None
    if name.endswith(".json"):
        info = json.loads(data)
        assert isinstance(info.pop(key), float), (rel, key)
        return json.dumps(info, sort_keys=True).encode()
    if name.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(data.decode())))
        assert rows and key in rows[0], (rel, key)
        return json.dumps([{k: v for k, v in row.items() if k != key} for row in rows]).encode()
    # HTML table: blank the cells of the column headed `key`.
    text = data.decode()
    headers = re.findall(r"<th>(.*?)</th>", text)
    assert key in headers, (rel, key, headers)
    col = headers.index(key)

    def blank(row: re.Match[str]) -> str:
        cells = re.findall(r"<td[^>]*>.*?</td>|<td></td>", row.group(1), re.DOTALL)
        assert len(cells) == len(headers), (rel, row.group(0))
        cells[col] = "<td></td>"
        return "<tr>" + "".join(cells) + "</tr>"

    return re.sub(r"<tr>((?:<td.*?)?)</tr>", blank, text, flags=re.DOTALL).encode()


def test_slurm_outputs_equal_local_outputs(runs: dict[str, Run]) -> None:
    slurm, local = runs["slurm"].workdir, runs["local"].workdir
    files = _artifacts(slurm)
    assert files == _artifacts(local)
    assert set(REQUIRED_ARTIFACTS) <= files
    fits = [f for f in files if f.startswith("resources/cutouts/") and f.endswith(".fits")]
    assert len(fits) == CONFIG["simulated"]["n_galaxies"]
    timed, differ = [], []
    for rel in sorted(files):
        a, b = (slurm / rel).read_bytes(), (local / rel).read_bytes()
        if a == b:
            continue
        a_clean, b_clean = _without_times(rel, a), _without_times(rel, b)
        if a_clean is not None and a_clean == b_clean:
            timed.append(rel)
        else:
            differ.append(rel)
    assert not differ, f"SLURM and local runs differ in {differ}"
    # Only files with wall-clock fields may differ, and only in those fields.
    assert {r.rsplit("/", 1)[-1] for r in timed if not r.endswith(".fits")} <= set(TIMED_FIELDS), timed
