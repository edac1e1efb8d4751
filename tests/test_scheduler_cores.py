"""Snakemake must never run more threads at once than ``--cores`` allows.

Snakemake 9.10.0 to 9.16.3 leak cores on local runs (upstream issue
https://github.com/snakemake/snakemake/issues/3913, "Greedy scheduler uses more cores than
provided"; it happens with the ILP scheduler too).  In ``JobScheduler.job_selector``
(``snakemake/scheduling/job_scheduler.py``) a shortcut for "exactly one job is ready" returned
the selected job without ``update_available_resources``, so that job's threads were never taken
from the free cores but were given back when it finished: every lone job (catalogue, split, ...)
added its threads to the pool.  A ``galpipe`` run with ``--cores 2`` then started three 2-thread
``train`` jobs at once, right after ``split``.  Snakemake 9.17.0 removed the shortcut; 9.16.3 to
9.19.x also read ``runtime`` from profiles as seconds instead of minutes (upstream #4039, fixed
in 9.20.0), which would shorten every SLURM time limit of ``profiles/slurm``.  ``pyproject.toml``
therefore requires ``snakemake>=9.20``.

The toy workflow below has the shape that triggers the leak: one 2-thread job, then three
independent 2-thread jobs.  Each job records when it ran; with ``--cores 2`` no two may overlap.
On Snakemake 9.15.0 two of the three ran together (4 threads on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
CORES = 2

#: Releases with a known bug that breaks galpipe runs: the core leak (9.10.0-9.16.3) and the
#: profile ``runtime`` read as seconds (9.16.3-9.19.x).  One of each minor series is enough.
AFFECTED = ("9.10.0", "9.12.0", "9.14.5", "9.15.0", "9.16.3", "9.17.0", "9.18.2", "9.19.0")

STAMP = """\
import json, sys, time
out, threads, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
start = time.time()
time.sleep(seconds)
end = time.time()
with open(out, "w") as f:
    json.dump({"start": start, "end": end, "threads": threads}, f)
"""

SNAKEFILE = """\
PY = config["python"]

rule all:
    input: expand("work/{n}.json", n=[1, 2, 3])

rule prepare:
    output: "prepare.json"
    threads: 2
    shell: '"{PY}" stamp.py {output} {threads} 0.2'

rule work:
    input: "prepare.json"
    output: "work/{n}.json"
    threads: 2
    shell: '"{PY}" stamp.py {output} {threads} 0.5'
"""


def snakemake_requirement() -> Requirement:
    """The ``snakemake`` entry of ``[project].dependencies`` in pyproject.toml."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps if Requirement(d).name == "snakemake"]
    assert len(reqs) == 1, f"expected one snakemake dependency in pyproject.toml, found {deps}"
    return reqs[0]


def peak_threads(jobs: dict[str, dict]) -> tuple[int, list[str]]:
    """Largest number of threads in use at one instant, and the jobs running then.

    Parameters
    ----------
    jobs : dict of str to dict
        Job name -> ``{"start": float, "end": float, "threads": int}`` (Unix times, seconds).

    Returns
    -------
    peak : int
        Maximum over time of the summed ``threads`` of the jobs running.
    running : list of str
        The jobs running at (the first instant of) that maximum, sorted.
    """
    # a job that ends at the instant another starts does not overlap it: ends sort first (0 < 1)
    events = sorted((t, kind, name) for name, j in jobs.items() for t, kind in ((j["start"], 1), (j["end"], 0)))
    running: set[str] = set()
    peak, at_peak = 0, []
    for _, kind, name in events:
        if kind:
            running.add(name)
            in_use = sum(jobs[n]["threads"] for n in running)
            if in_use > peak:
                peak, at_peak = in_use, sorted(running)
        else:
            running.discard(name)
    return peak, at_peak


def test_peak_threads_counts_only_overlapping_jobs() -> None:
    jobs = {"a": {"start": 0.0, "end": 1.0, "threads": 2}, "b": {"start": 1.0, "end": 2.0, "threads": 2},
            "c": {"start": 1.5, "end": 3.0, "threads": 1}}
    assert peak_threads(jobs) == (3, ["b", "c"])


def test_dependency_excludes_affected_snakemake_releases() -> None:
    spec = snakemake_requirement().specifier
    admitted = [v for v in AFFECTED if spec.contains(v)]
    assert not admitted, f"pyproject.toml's {snakemake_requirement()} admits broken Snakemake releases {admitted}"
    assert spec.contains("9.20.0"), f"pyproject.toml's {snakemake_requirement()} rejects the first fixed release"


def test_installed_snakemake_meets_the_requirement() -> None:
    req, have = snakemake_requirement(), version("snakemake")
    assert req.specifier.contains(Version(have)), (
        f"installed Snakemake {have} does not satisfy pyproject.toml's {req}: this environment is stale, "
        "reinstall with `pip install -e '.[test,slurm]'` (make does it when pyproject.toml changes)")


@pytest.mark.timeout(180)
def test_threads_never_exceed_cores(tmp_path: Path) -> None:
    (tmp_path / "Snakefile").write_text(SNAKEFILE, encoding="utf-8")
    (tmp_path / "stamp.py").write_text(STAMP, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "SNAKEMAKE_PROFILE"}
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(CORES), "--workflow-profile", "none",
           "--config", f"python={sys.executable}"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=150)
    assert res.returncode == 0, f"snakemake failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-4000:]}"
    files = [tmp_path / "prepare.json", *sorted((tmp_path / "work").glob("*.json"))]
    jobs = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in files}
    assert len(jobs) == 4, f"expected prepare and 3 work jobs, found {sorted(jobs)}"
    peak, running = peak_threads(jobs)
    assert peak <= CORES, (
        f"Snakemake {version('snakemake')} ran {running} at once: {peak} threads on --cores {CORES} "
        "(snakemake/snakemake#3913, fixed in 9.17.0)")
