"""Scale benchmark: the real workflow on simulated surveys of growing size.

For each size (default 10,000 and 100,000 galaxies; 64x64 cutouts in g, r, i) the script
writes a config into a fresh work directory and runs Snakemake there (``--cores 2`` by
default) through catalogue -> cutouts -> normalise -> split -> train, with ONE training epoch
of the small CNN (``config/architectures/small_cnn.yaml``, batch 64, streaming shuffle buffer).
Evaluation and the catalogue-feature baseline are not part of it.  It prints:

* galaxies per second per stage: galaxies / summed job seconds of the stage (from each job's
  Snakemake ``benchmark:`` TSV in ``logs/benchmarks``), i.e. per-core throughput, plus the
  stage's wall-clock span in the run; training is training-set galaxies per second of the
  whole train job (one epoch + one validation pass);
* the number of jobs in the DAG (``snakemake -n``, target ``all``) at the same shard count;
* the time of a no-op rerun (``snakemake`` again: "Nothing to be done");
* the peak resident memory per stage (largest ``max_rss`` of the stage's jobs).

and checks, printing PASS/FAIL:

* the DAG has the same number of jobs for every size (same shard count);
* the no-op rerun of the largest size takes under 10 s;
* training peak memory at the largest size is at most 1.5x that at the smallest and under 4 GiB;
* every stage's throughput at the largest size is within 20% of (at least 0.8x) that at the
  smallest.

``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` (set by some environments, they halve OpenBLAS
matmul speed) are removed from the environment at the top of this script, before NumPy is
imported, so neither this process nor the Snakemake runs (which inherit the environment) see
them.

The disk needed (FITS cutouts, normalised shards and split files, about 170 kB per galaxy)
is checked before anything runs; the work directories are deleted at the end unless ``--keep``.

Usage::

    python benchmarks/scale.py                        # 10k and 100k (long: see --help)
    python benchmarks/scale.py --sizes 1000 10000     # quick check
    python benchmarks/scale.py --sizes 10000 30000 --root /work/scale-bench --keep
"""

from __future__ import annotations

import os

_BAD_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
#: What was removed from the environment (reported in the output).
REMOVED_ENV = [f"{k}={os.environ.pop(k)}" for k in _BAD_ENV if k in os.environ]

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
STAGES = ("catalogue", "cutouts", "normalise", "split", "train")
EXPERIMENT = "small_cnn"
#: Disk per galaxy: FITS cutout (~66 kB for 64x64x3 float32 with headers) + normalised shard
#: and split copies (~2 x 45 kB zstd float32) + margin.
BYTES_PER_GALAXY = 170_000
GIB = 1024**3


@dataclass
class StageStats:
    """Measurements of one stage (all its jobs) in one run."""

    jobs: int = 0
    job_seconds: float = 0.0
    max_rss_mb: float = 0.0
    wall_seconds: float = 0.0
    galaxies: int = 0

    @property
    def rate(self) -> float:
        """Galaxies per job-second (per-core throughput)."""
        return self.galaxies / self.job_seconds if self.job_seconds > 0 else float("nan")


@dataclass
class SizeResult:
    """Everything measured for one catalogue size."""

    n: int
    dag_jobs: int = 0
    dag_counts: dict[str, int] = field(default_factory=dict)
    run_seconds: float = 0.0
    noop_seconds: float = 0.0
    noop_ok: bool = False
    stages: dict[str, StageStats] = field(default_factory=dict)
    n_train: int = 0
    loadavg_start: tuple[float, float, float] = (0.0, 0.0, 0.0)
    loadavg_end: tuple[float, float, float] = (0.0, 0.0, 0.0)


def make_config(n: int, shards: int, seed: int, batch_size: int) -> dict[str, Any]:
    """Config of one benchmark run: ``n`` simulated galaxies, 64x64 g/r/i, one epoch."""
    return {
        "source": "simulated",
        "seed": seed,
        "bands": ["g", "r", "i"],
        "cutout_size": 64,
        "shards": shards,
        "simulated": {"n_galaxies": n},
        "split": {"row_group_size": 256},
        "training": {"epochs": 1, "batch_size": batch_size, "early_stopping_patience": 0},
        "experiments": {EXPERIMENT: {"architecture": "small_cnn"}},
    }


def snakemake(workdir: Path, cores: int, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run Snakemake on the galpipe workflow in ``workdir`` (environment inherited)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir),
           "--configfile", str(workdir / "config" / "config.yaml"), "--workflow-profile", "none",
           "--cores", str(cores), *args]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


def dag_job_counts(workdir: Path, cores: int) -> dict[str, int]:
    """Jobs per rule that ``snakemake -n`` plans for the whole workflow (target ``all``)."""
    res = snakemake(workdir, cores, "-n", timeout=600)
    if res.returncode != 0:
        raise SystemExit(f"snakemake -n failed in {workdir}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    out = res.stdout + res.stderr
    block = out.split("Job stats:")[-1]
    counts = {}
    for line in block.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m:
            counts[m.group(1)] = int(m.group(2))
    if "total" not in counts:
        raise SystemExit(f"no job stats in the output of snakemake -n:\n{out[-3000:]}")
    return counts


def read_benchmark(path: Path) -> tuple[float, float]:
    """(seconds, max_rss in MB) from a Snakemake ``benchmark:`` TSV."""
    with open(path, newline="") as fh:
        row = next(csv.DictReader(fh, delimiter="\t"))
    rss = row.get("max_rss", "NA")
    return float(row["s"]), float(rss) if rss not in ("NA", "-", "") else float("nan")


def stage_spans(log: str) -> dict[str, float]:
    """Wall-clock seconds from a stage's first job start to its last job end, from the log."""
    stamp = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
    starts: dict[str, list[datetime]] = {}
    ends: dict[str, list[datetime]] = {}
    current: datetime | None = None
    for line in log.splitlines():
        m = stamp.match(line.strip())
        if m:
            current = datetime.strptime(" ".join(m.group(1).split()), "%a %b %d %H:%M:%S %Y")
            continue
        if current is None:
            continue
        m = re.match(r"^(?:local)?rule (\w+):$", line.strip())
        if m:
            starts.setdefault(m.group(1), []).append(current)
        m = re.search(r"Finished jobid: \d+ \(Rule: (\w+)\)", line)
        if m:
            ends.setdefault(m.group(1), []).append(current)
    return {r: (max(ends[r]) - min(starts[r])).total_seconds() for r in starts if r in ends}


def run_size(n: int, root: Path, args: argparse.Namespace) -> SizeResult:
    """Run the workflow for ``n`` galaxies in ``root/n<n>`` and collect the measurements."""
    workdir = root / f"n{n}"
    if workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "config").mkdir(parents=True)
    cfg = make_config(n, args.shards, args.seed, args.batch_size)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = SizeResult(n=n, loadavg_start=os.getloadavg())
    res.dag_counts = dag_job_counts(workdir, args.cores)
    res.dag_jobs = res.dag_counts["total"]

    target = f"results/models/{EXPERIMENT}/train_info.json"
    print(f"[{n}] running the workflow up to {target} in {workdir} ...", flush=True)
    t0 = time.perf_counter()
    run = snakemake(workdir, args.cores, target)
    res.run_seconds = time.perf_counter() - t0
    (workdir / "snakemake.out").write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        raise SystemExit(f"[{n}] snakemake failed ({run.returncode}); log: {workdir / 'snakemake.out'}\n"
                         f"{(run.stdout + run.stderr)[-4000:]}")
    t0 = time.perf_counter()
    noop = snakemake(workdir, args.cores, target, timeout=600)
    res.noop_seconds = time.perf_counter() - t0
    res.noop_ok = noop.returncode == 0 and "Nothing to be done" in noop.stdout + noop.stderr
    res.loadavg_end = os.getloadavg()

    bench = workdir / "logs" / "benchmarks"
    spans = stage_spans(run.stdout + run.stderr)
    summary = json.loads((workdir / "results" / "split" / "summary.json").read_text())
    res.n_train = sum(summary["counts"]["train"].values())
    files = {
        "catalogue": [bench / "catalogue.tsv"],
        "cutouts": sorted((bench / "cutouts").glob("*.tsv")),
        "normalise": sorted((bench / "normalise").glob("*.tsv")),
        "split": [bench / "split.tsv"],
        "train": [bench / "train" / f"{EXPERIMENT}.tsv"],
    }
    for stage in STAGES:
        st = StageStats(jobs=len(files[stage]), wall_seconds=spans.get(stage, float("nan")),
                        galaxies=res.n_train if stage == "train" else n)
        for path in files[stage]:
            seconds, rss = read_benchmark(path)
            st.job_seconds += seconds
            st.max_rss_mb = max(st.max_rss_mb, rss)
        res.stages[stage] = st
    return res


def check_disk(root: Path, sizes: list[int]) -> None:
    """Stop unless ``root``'s file system has room for the largest run (runs are sequential)."""
    need = max(sizes) * BYTES_PER_GALAXY * 1.2
    free = shutil.disk_usage(root).free
    print(f"disk: {free / GIB:.1f} GiB free under {root}; the largest run needs about {need / GIB:.1f} GiB")
    if free < need:
        raise SystemExit(f"not enough disk space under {root}: {free / GIB:.1f} GiB free, "
                         f"need about {need / GIB:.1f} GiB (use --root elsewhere or smaller --sizes)")


def report(results: list[SizeResult], args: argparse.Namespace) -> bool:
    """Print the figures and the PASS/FAIL checks; return True when every check passes."""
    print()
    print("=" * 100)
    print(f"galpipe scale benchmark: {os.cpu_count()} CPUs, snakemake --cores {args.cores}, "
          f"{args.shards} shards, 64x64 g,r,i, small_cnn 1 epoch batch {args.batch_size}")
    print("removed from the environment before numpy was imported (also for snakemake): "
          + (", ".join(REMOVED_ENV) if REMOVED_ENV else "nothing (neither variable was set)"))
    for r in results:
        print()
        print(f"--- {r.n} galaxies ({r.n_train} in the training split): run {r.run_seconds:.1f} s, "
              f"load average {r.loadavg_start[0]:.2f} at start, {r.loadavg_end[0]:.2f} at end")
        print(f"    DAG (snakemake -n, target all): {r.dag_jobs} jobs  "
              + ", ".join(f"{k}={v}" for k, v in r.dag_counts.items() if k != "total"))
        print(f"    no-op rerun: {r.noop_seconds:.2f} s ({'Nothing to be done' if r.noop_ok else 'NOT a no-op!'})")
        print(f"    {'stage':<10} {'jobs':>4} {'job s':>9} {'wall s':>8} {'galaxies':>9} "
              f"{'gal/s/job-s':>12} {'gal/s wall':>11} {'peak RSS MB':>12}")
        for name in STAGES:
            st = r.stages[name]
            wall_rate = st.galaxies / st.wall_seconds if st.wall_seconds > 0 else float("nan")
            print(f"    {name:<10} {st.jobs:>4} {st.job_seconds:>9.1f} {st.wall_seconds:>8.0f} {st.galaxies:>9} "
                  f"{st.rate:>12.1f} {wall_rate:>11.1f} {st.max_rss_mb:>12.0f}")
    if len(results) < 2:
        print("\n(one size only: the scaling checks need two)")
        return True
    small, big = results[0], results[-1]
    checks: list[tuple[str, bool]] = []
    checks.append((f"DAG job count equal at {args.shards} shards: "
                   + ", ".join(f"{r.n}: {r.dag_jobs}" for r in results),
                   len({r.dag_jobs for r in results}) == 1))
    checks.append((f"no-op rerun at {big.n} under 10 s: {big.noop_seconds:.2f} s",
                   big.noop_ok and big.noop_seconds < 10))
    t_small, t_big = small.stages["train"].max_rss_mb, big.stages["train"].max_rss_mb
    checks.append((f"training peak RSS at {big.n} <= 1.5 x at {small.n}: {t_big:.0f} MB vs {t_small:.0f} MB "
                   f"({t_big / t_small:.2f}x)", t_big <= 1.5 * t_small))
    checks.append((f"training peak RSS at {big.n} under 4 GiB: {t_big:.0f} MB", t_big < 4 * 1024))
    for name in STAGES:
        a, b = small.stages[name].rate, big.stages[name].rate
        checks.append((f"{name} throughput at {big.n} within 20% of {small.n}: {b:.1f} vs {a:.1f} gal/s "
                       f"({b / a:.2f}x)", b >= 0.8 * a))
    print()
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    print("=" * 100)
    return all(ok for _, ok in checks)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000],
                   help="catalogue sizes, smallest first (default: 10000 100000)")
    p.add_argument("--shards", type=int, default=4, help="catalogue shards, the same for every size (default 4)")
    p.add_argument("--cores", type=int, default=2, help="snakemake --cores (default 2)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size (default 64)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--root", type=Path, default=Path("/tmp/galpipe-scale"),
                   help="where the work directories go (default /tmp/galpipe-scale)")
    p.add_argument("--keep", action="store_true", help="keep the work directories")
    args = p.parse_args(argv)
    sizes = sorted(args.sizes)
    if sizes[0] < 10 * args.shards:
        p.error(f"sizes must be at least {10 * args.shards} (10 galaxies per shard)")
    created_root = not args.root.exists()
    args.root.mkdir(parents=True, exist_ok=True)
    check_disk(args.root, sizes)
    results = []
    try:
        for n in sizes:
            results.append(run_size(n, args.root, args))
            if not args.keep:
                shutil.rmtree(args.root / f"n{n}", ignore_errors=True)
    finally:
        if not args.keep:  # only what this script made
            for n in sizes:
                shutil.rmtree(args.root / f"n{n}", ignore_errors=True)
            if created_root:
                shutil.rmtree(args.root, ignore_errors=True)
    return 0 if report(results, args) else 1


if __name__ == "__main__":
    sys.exit(main())
