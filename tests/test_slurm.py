"""Run workflows through a real SLURM cluster with ``--workflow-profile profiles/slurm``.

Needs the one-node cluster started by ``scripts/slurm/start.sh`` and the executor plugin
(``pip install -e '.[slurm]'``).  Without them every test here skips with the reason; set
``GALPIPE_REQUIRE_SLURM=1`` (CI) to turn that skip into a failure.

Both workflows run at the same time (about 50 s in all).  Every Snakemake run is wrapped
in ``timeout -k``: without slurmdbd a misconfigured status
command makes Snakemake wait forever, ignoring SIGTERM.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SLURM_PROFILE = REPO / "profiles" / "slurm"
#: Partition created by scripts/slurm/start.sh and named in profiles/slurm/config.yaml.
PARTITION = "galpipe"
#: Hard limit for one Snakemake run (seconds); the runs below take 20-60 s.
RUN_LIMIT_S = 360
USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing"}

#: Two ``make`` jobs (wildcards) feeding one ``combine`` job; each job records the SLURM
#: environment it ran in, so the test can tell that every rule was its own sbatch job.
TINY_SNAKEFILE = textwrap.dedent(
    """\
    ENV = "$SLURM_JOB_ID $SLURM_CPUS_PER_TASK $SLURM_JOB_PARTITION"


    rule all:
        input:
            "out/summary.txt",


    rule make:
        output:
            "out/part_{i}.txt",
        threads: 1
        resources:
            mem_mb=200,
            runtime=2,
        shell:
            f"echo part {{wildcards.i}} {ENV} > {{output}}"


    rule combine:
        input:
            expand("out/part_{i}.txt", i=[1, 2]),
        output:
            "out/summary.txt",
        threads: 2
        resources:
            mem_mb=300,
            runtime=2,
        shell:
            f"cat {{input}} > {{output}} && echo combine all {ENV} >> {{output}}"
    """
)

FAILING_SNAKEFILE = textwrap.dedent(
    """\
    rule boom:
        output:
            "boom.txt",
        resources:
            mem_mb=100,
            runtime=1,
        shell:
            "echo galpipe-slurm-test-failure >&2; exit 3"
    """
)


def _slurm_unavailable() -> str | None:
    """Why the SLURM tests cannot run here, or None when the cluster is usable."""
    if shutil.which("sinfo") is None:
        return "sinfo not on PATH: no SLURM here (start one with scripts/slurm/start.sh)"
    if shutil.which("timeout") is None:
        return "coreutils `timeout` not on PATH (needed to bound Snakemake runs)"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm not installed (pip install -e '.[slurm]')"
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-p", PARTITION, "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s: slurmctld not running?"
    if proc.returncode != 0:
        return f"sinfo failed ({proc.stderr.strip()}): run scripts/slurm/start.sh"
    states = set(proc.stdout.split())
    if not states & USABLE_NODE_STATES:
        return (
            f"no usable node in SLURM partition {PARTITION!r} (sinfo states: "
            f"{sorted(states) or 'none'}): run scripts/slurm/start.sh"
        )
    return None


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    """Skip (or fail, with GALPIPE_REQUIRE_SLURM=1) unless the local cluster is usable."""
    reason = _slurm_unavailable()
    if reason is None:
        return
    if os.environ.get("GALPIPE_REQUIRE_SLURM") == "1":
        pytest.fail(f"GALPIPE_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def _cancel_jobs_in(workdir: Path) -> None:
    """Cancel any SLURM job still queued or running with ``workdir`` as working directory."""
    proc = subprocess.run(
        ["squeue", "-h", "-o", "%i|%Z"], capture_output=True, text=True, timeout=20, check=False
    )
    ids = [
        line.split("|", 1)[0]
        for line in proc.stdout.splitlines()
        if line.partition("|")[2] == str(workdir)
    ]
    if ids:
        subprocess.run(["scancel", *ids], timeout=20, check=False)


def _submit_env() -> dict[str, str]:
    """This environment minus a surrounding SLURM job's variables (Snakemake must submit
    from outside any job); SLURM_CONF is kept."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SLURM_") or key == "SLURM_CONF"
    }


@dataclass(frozen=True)
class SnakemakeRun:
    """Outcome of one bounded Snakemake run through profiles/slurm."""

    workdir: Path
    returncode: int
    log: str


def _snakemake_cmd(workdir: Path, *extra: str) -> list[str]:
    """Snakemake on ``workdir/Snakefile`` through profiles/slurm, killed after RUN_LIMIT_S."""
    return [
        "timeout", "-k", "10", str(RUN_LIMIT_S),
        sys.executable, "-m", "snakemake",
        "-s", str(workdir / "Snakefile"),
        "-d", str(workdir),
        "--workflow-profile", str(SLURM_PROFILE),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def slurm_runs(
    slurm_cluster: None, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, SnakemakeRun]:
    """Run the tiny and the failing workflow at the same time (halves the wall time).

    Output goes to a file per run, so neither process can block on a full pipe.
    """
    specs = {"tiny": (TINY_SNAKEFILE, ()), "failing": (FAILING_SNAKEFILE, ("--retries", "0"))}
    started: dict[str, tuple[Path, subprocess.Popen[bytes]]] = {}
    try:
        for name, (snakefile, extra) in specs.items():
            workdir = tmp_path_factory.mktemp(f"slurm_{name}")
            (workdir / "Snakefile").write_text(snakefile)
            with open(workdir / "snakemake.out", "wb") as out:
                proc = subprocess.Popen(
                    _snakemake_cmd(workdir, *extra),
                    cwd=workdir,
                    env=_submit_env(),
                    stdout=out,
                    stderr=out,
                )
            started[name] = (workdir, proc)
        runs = {}
        for name, (workdir, proc) in started.items():
            returncode = proc.wait(timeout=RUN_LIMIT_S + 30)
            log = (workdir / "snakemake.out").read_text(errors="replace")
            runs[name] = SnakemakeRun(workdir, returncode, log)
    finally:
        for workdir, proc in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            _cancel_jobs_in(workdir)
    return runs


def _job_fields(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """State, partition, CPUs, memory and name of finished jobs, as squeue reports them.

    Works without slurmdbd because the test cluster keeps jobs for MinJobAge=600 s.
    """
    proc = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%P|%C|%m|%j"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    fields = {}
    for line in proc.stdout.splitlines():
        jid, state, part, cpus, mem, name = line.split("|")
        fields[jid] = {"state": state, "partition": part, "cpus": cpus, "mem": mem, "name": name}
    return fields


def test_tiny_workflow_runs_each_rule_as_sbatch_job(slurm_runs: dict[str, SnakemakeRun]) -> None:
    run = slurm_runs["tiny"]
    workdir = run.workdir
    assert run.returncode != 124, f"snakemake hung for {RUN_LIMIT_S}s:\n{run.log[-4000:]}"
    assert run.returncode == 0, run.log[-4000:]

    # Each job recorded "<rule> <wildcard|all> <SLURM_JOB_ID> <cpus per task> <partition>".
    records = {}
    for i in (1, 2):
        (line,) = (workdir / f"out/part_{i}.txt").read_text().splitlines()
        records[f"make_{i}"] = line.split()
    summary = (workdir / "out/summary.txt").read_text().splitlines()
    assert [r.split() for r in summary[:2]] == [records["make_1"], records["make_2"]]
    records["combine"] = summary[2].split()
    assert [r[0] for r in records.values()] == ["part", "part", "combine"]
    assert [r[1] for r in records.values()] == ["1", "2", "all"]
    job_ids = {key: rec[2] for key, rec in records.items()}
    assert all(re.fullmatch(r"\d+", j) for j in job_ids.values()), records
    assert len(set(job_ids.values())) == 3, f"rules did not run as separate jobs: {records}"
    # threads -> --cpus-per-task, default-resources slurm_partition -> -p.
    assert [rec[3] for rec in records.values()] == ["1", "1", "2"], records
    assert {rec[4] for rec in records.values()} == {PARTITION}, records

    # The plugin's per-job logs (kept by slurm-keep-successful-logs) are named by job id.
    logdir = workdir / ".snakemake" / "slurm_logs"
    assert (logdir / "rule_make" / "1" / f"{job_ids['make_1']}.log").is_file()
    assert (logdir / "rule_make" / "2" / f"{job_ids['make_2']}.log").is_file()
    assert (logdir / "rule_combine" / f"{job_ids['combine']}.log").is_file()

    # SLURM itself saw three completed jobs of one Snakemake run with the declared resources.
    fields = _job_fields(list(job_ids.values()))
    assert set(fields) == set(job_ids.values()), fields
    assert {f["state"] for f in fields.values()} == {"COMPLETED"}, fields
    run_id = re.search(r"SLURM run ID: (\S+)", run.log)
    assert run_id, run.log[-4000:]
    assert {f["name"] for f in fields.values()} == {run_id.group(1)}, fields
    assert [fields[job_ids[k]]["cpus"] for k in ("make_1", "make_2", "combine")] == ["1", "1", "2"]
    assert [fields[job_ids[k]]["mem"] for k in ("make_1", "make_2", "combine")] == [
        "200M",
        "200M",
        "300M",
    ]


def test_failing_job_ends_run_with_error(slurm_runs: dict[str, SnakemakeRun]) -> None:
    """A failed SLURM job is detected through squeue and ends the run (no hang, no retry)."""
    run = slurm_runs["failing"]
    workdir = run.workdir
    assert run.returncode != 124, f"snakemake hung for {RUN_LIMIT_S}s:\n{run.log[-4000:]}"
    assert run.returncode == 1, run.log[-4000:]
    match = re.search(r"SLURM-job '(\d+)' failed, SLURM status is: 'FAILED'", run.log)
    assert match, run.log[-4000:]
    assert not (workdir / "boom.txt").exists()
    # The failed job's log is kept and holds the rule's stderr.
    job_log = workdir / ".snakemake" / "slurm_logs" / "rule_boom" / f"{match.group(1)}.log"
    assert "galpipe-slurm-test-failure" in job_log.read_text()
