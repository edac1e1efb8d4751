"""Scale benchmark: the real workflow on simulated surveys of growing size.

For each size (default 10,000 and 100,000 galaxies; 64x64 cutouts in g, r, i) the script
writes a config into a fresh work directory and runs Snakemake there (``--cores 2`` by
default) through catalogue -> cutouts -> normalise -> split -> train, with ONE training epoch
of the small CNN (``config/architectures/small_cnn.yaml``, batch 64, streaming shuffle buffer).
Evaluation and the catalogue-feature baseline are not part of it.  Each stage is one Snakemake
invocation with that stage's outputs as targets (all its shard jobs, ``--cores`` at a time),
run under a small wrapper that records its wall time and, from ``getrusage(RUSAGE_CHILDREN)``,
the CPU time and the exact peak resident memory of the largest process (the Snakemake process
itself, about 200 MB, or one of the stage's jobs).  It prints per stage:

* galaxies per second: galaxies / wall seconds of the stage (training: training-split galaxies
  over the whole train job, one epoch plus one validation pass), and per CPU-second (less
  sensitive to other load on a shared machine);
* the summed job seconds and the largest ``max_rss`` of the stage's Snakemake ``benchmark:``
  TSVs (``logs/benchmarks``; Snakemake samples it every 30 s, so it can miss peaks), next to
  the exact peak RSS above;
* how many CPUs the stage kept busy on average (its CPU s / wall s) and how many other
  processes on the machine took meanwhile (``/proc/stat`` busy time minus the stage's), and
  the 1-minute load average when the stage ended: on a shared machine, a wall-clock
  throughput drop with an unchanged per-CPU-second throughput and a large "other" is
  contention, not a scaling problem;

and per size the number of jobs in the DAG (``snakemake -n``, target ``all``, same shard count)
and the time of a no-op rerun (``snakemake`` again for the train target: "Nothing to be done").
Checks, printed as PASS/FAIL:

* the DAG has the same number of jobs for every size (same shard count);
* the no-op rerun of the largest size takes under 10 s;
* training peak RSS at the largest size is at most 1.5x that at the smallest and under 4 GiB;
* every stage's throughput (galaxies per wall second; per CPU-second with ``--gate cpu``) at
  the largest size is within 20% of (at least 0.8x) that at the smallest.

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
    python benchmarks/scale.py --gate cpu             # on a machine shared with other work
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
    """Measurements of one stage (one Snakemake invocation running all the stage's jobs)."""

    galaxies: int = 0
    jobs: int = 0
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    max_rss_mb: float = 0.0
    job_seconds: float = 0.0
    sampled_rss_mb: float = 0.0
    loadavg: float = 0.0
    machine_cpu_seconds: float = float("nan")

    @property
    def cores_used(self) -> float:
        """Average number of CPUs busy with this stage (its CPU s over its wall s)."""
        return self.cpu_seconds / self.wall_seconds if self.wall_seconds > 0 else float("nan")

    @property
    def other_cores(self) -> float:
        """Average number of CPUs busy with anything else on the machine during the stage."""
        if self.wall_seconds <= 0:
            return float("nan")
        return (self.machine_cpu_seconds - self.cpu_seconds) / self.wall_seconds

    @property
    def rate(self) -> float:
        """Galaxies per wall-clock second of the stage."""
        return self.galaxies / self.wall_seconds if self.wall_seconds > 0 else float("nan")

    @property
    def cpu_rate(self) -> float:
        """Galaxies per CPU-second of the stage (Snakemake process and jobs)."""
        return self.galaxies / self.cpu_seconds if self.cpu_seconds > 0 else float("nan")


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


#: Runs a command and writes its wall time and, from ``getrusage(RUSAGE_CHILDREN)``, the peak
#: RSS of the largest process it waited for (Linux passes the maximum up through waits: the
#: Snakemake process and every job it ran) and their CPU time, as JSON to ``argv[1]``.
MEASURE = """\
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.call(sys.argv[2:])
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as fh:
    json.dump({"rc": rc, "seconds": time.perf_counter() - t0, "max_rss_mb": ru.ru_maxrss / 1024,
               "cpu_seconds": ru.ru_utime + ru.ru_stime}, fh)
"""


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``; NaN elsewhere).

    Busy = all time except idle and iowait; the difference over a stage minus the stage's own
    CPU time is what other processes (other users, other benchmarks) took meanwhile.
    """
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def snakemake_cmd(workdir: Path, cores: int, *args: str) -> list[str]:
    """Snakemake on the galpipe workflow in ``workdir``, local execution with ``cores``."""
    return [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir),
            "--configfile", str(workdir / "config" / "config.yaml"), "--workflow-profile", "none",
            "--cores", str(cores), *args]


def snakemake(workdir: Path, cores: int, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run Snakemake in ``workdir`` (environment inherited, minus the OpenBLAS variables)."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.run(snakemake_cmd(workdir, cores, *args), cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=timeout)


def measured_snakemake(workdir: Path, cores: int, targets: list[str], log: Path) -> dict[str, float]:
    """Run Snakemake for ``targets``, output appended to ``log``; wall s, CPU s, peak RSS MB."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = workdir / ".measure.json"
    with open(log, "a") as fh:
        subprocess.run([sys.executable, "-c", MEASURE, str(out), *snakemake_cmd(workdir, cores, *targets)],
                       cwd=workdir, env=env, stdout=fh, stderr=subprocess.STDOUT, check=True)
    m = json.loads(out.read_text())
    out.unlink()
    if m["rc"] != 0:
        raise SystemExit(f"snakemake failed ({m['rc']}) for {targets}; log: {log}\n{log.read_text()[-4000:]}")
    return m


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


def stage_targets(shards: int) -> dict[str, list[str]]:
    """The files each stage makes (Snakemake targets), in pipeline order."""
    ids = [f"{i:04d}" for i in range(shards)]
    return {
        "catalogue": ["results/catalogue/catalogue.parquet"],
        "cutouts": [f"results/cutouts/{i}.parquet" for i in ids],
        "normalise": [f"results/normalised/{i}.parquet" for i in ids],
        "split": ["results/split/train.parquet"],
        "train": [f"results/models/{EXPERIMENT}/train_info.json"],
    }


def run_size(n: int, root: Path, args: argparse.Namespace) -> SizeResult:
    """Run the workflow for ``n`` galaxies in ``root/n<n>``, one stage at a time, and measure it."""
    workdir = root / f"n{n}"
    if workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "config").mkdir(parents=True)
    cfg = make_config(n, args.shards, args.seed, args.batch_size)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = SizeResult(n=n, loadavg_start=os.getloadavg())
    res.dag_counts = dag_job_counts(workdir, args.cores)
    res.dag_jobs = res.dag_counts["total"]
    log = workdir / "snakemake.out"
    bench = workdir / "logs" / "benchmarks"
    tsvs = {
        "catalogue": lambda: [bench / "catalogue.tsv"],
        "cutouts": lambda: sorted((bench / "cutouts").glob("*.tsv")),
        "normalise": lambda: sorted((bench / "normalise").glob("*.tsv")),
        "split": lambda: [bench / "split.tsv"],
        "train": lambda: [bench / "train" / f"{EXPERIMENT}.tsv"],
    }
    targets = stage_targets(args.shards)
    for stage in STAGES:
        print(f"[{n}] {stage} ...", flush=True)
        busy0 = machine_busy_seconds()
        m = measured_snakemake(workdir, args.cores, targets[stage], log)
        st = StageStats(galaxies=n, wall_seconds=m["seconds"], cpu_seconds=m["cpu_seconds"],
                        max_rss_mb=m["max_rss_mb"], loadavg=os.getloadavg()[0],
                        machine_cpu_seconds=machine_busy_seconds() - busy0)
        files = tsvs[stage]()
        st.jobs = len(files)
        for path in files:
            seconds, rss = read_benchmark(path)
            st.job_seconds += seconds
            st.sampled_rss_mb = max(st.sampled_rss_mb, rss)
        res.stages[stage] = st
        res.run_seconds += m["seconds"]
    summary = json.loads((workdir / "results" / "split" / "summary.json").read_text())
    res.n_train = sum(summary["counts"]["train"].values())
    res.stages["train"].galaxies = res.n_train

    t0 = time.perf_counter()
    noop = snakemake(workdir, args.cores, *targets["train"], timeout=600)
    res.noop_seconds = time.perf_counter() - t0
    res.noop_ok = noop.returncode == 0 and "Nothing to be done" in noop.stdout + noop.stderr
    res.loadavg_end = os.getloadavg()
    return res


def check_disk(root: Path, sizes: list[int]) -> None:
    """Stop unless ``root``'s file system has room for the largest run (runs are sequential)."""
    need = max(sizes) * BYTES_PER_GALAXY * 1.2
    free = shutil.disk_usage(root).free
    print(f"disk: {free / GIB:.1f} GiB free under {root}; the largest run needs about {need / GIB:.1f} GiB")
    if free < need:
        raise SystemExit(f"not enough disk space under {root}: {free / GIB:.1f} GiB free, "
                         f"need about {need / GIB:.1f} GiB (use --root elsewhere or smaller --sizes)")


def print_size(r: SizeResult) -> None:
    """Print the figures of one size."""
    print()
    print(f"--- {r.n} galaxies ({r.n_train} in the training split): stages took {r.run_seconds:.1f} s; "
          f"load average (1 min) {r.loadavg_start[0]:.2f} at start, {r.loadavg_end[0]:.2f} at end")
    print(f"    DAG (snakemake -n, target all): {r.dag_jobs} jobs  "
          + ", ".join(f"{k}={v}" for k, v in r.dag_counts.items() if k != "total"))
    print(f"    no-op rerun: {r.noop_seconds:.2f} s ({'Nothing to be done' if r.noop_ok else 'NOT a no-op!'})")
    print("    (peak RSS: exact, ru_maxrss of Snakemake and the stage's jobs; sampled: benchmark TSV max_rss; "
          "cores: CPUs this stage kept busy; other: CPUs busy with other processes)")
    print(f"    {'stage':<10} {'galaxies':>8} {'jobs':>4} {'wall s':>8} {'gal/s':>8} {'CPU s':>8} "
          f"{'gal/CPU-s':>9} {'job s':>8} {'peak RSS MB':>11} {'sampled':>8} {'cores':>5} {'other':>5} "
          f"{'load':>5}")
    for name in STAGES:
        st = r.stages[name]
        print(f"    {name:<10} {st.galaxies:>8} {st.jobs:>4} {st.wall_seconds:>8.1f} {st.rate:>8.1f} "
              f"{st.cpu_seconds:>8.1f} {st.cpu_rate:>9.1f} {st.job_seconds:>8.1f} {st.max_rss_mb:>11.0f} "
              f"{st.sampled_rss_mb:>8.0f} {st.cores_used:>5.2f} {st.other_cores:>5.2f} {st.loadavg:>5.2f}",
              flush=True)


def slurm_probe_state() -> str:
    """Why a bare ``snakemake`` may start slowly here: the SLURM executor plugin's import-time probe.

    When the ``slurm`` extra is installed and SLURM's client tools are on ``PATH``, the
    plugin runs ``scontrol show config`` while Snakemake parses its command line (to pick
    a status command), with a 10 s timeout.  With the controller unreachable (client
    tools installed, ``slurmctld`` stopped) every Snakemake start, no-op reruns included,
    waits those 10 s.  A laptop without SLURM or a cluster login node does not.
    """
    if shutil.which("sinfo") is None or shutil.which("scontrol") is None:
        return "no SLURM client tools on PATH (the plugin's probe is skipped)"
    try:
        ok = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if ok:
        return "SLURM client tools on PATH and the controller answers (the plugin's probe is quick)"
    return ("WARNING: SLURM client tools on PATH but no controller answers: the SLURM executor plugin's "
            "import-time 'scontrol show config' makes every Snakemake start wait up to 10 s "
            "(start the cluster, scripts/slurm/start.sh, or uninstall the slurm extra)")


def report(results: list[SizeResult], args: argparse.Namespace) -> bool:
    """Print the figures and the PASS/FAIL checks; return True when every check passes."""
    print()
    print("=" * 100)
    print(f"galpipe scale benchmark: {os.cpu_count()} CPUs, snakemake --cores {args.cores}, "
          f"{args.shards} shards, 64x64 g,r,i, small_cnn 1 epoch batch {args.batch_size}, "
          f"throughput gate: per {'wall' if args.gate == 'wall' else 'CPU'} second")
    print("removed from the environment before numpy was imported (also for snakemake): "
          + (", ".join(REMOVED_ENV) if REMOVED_ENV else "nothing (neither variable was set)"))
    print(f"SLURM: {args.slurm_state}")
    for r in results:
        print_size(r)
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
    t_small, t_big = small.stages["train"].max_rss_mb, big.stages["train"].max_rss_mb  # ru_maxrss
    checks.append((f"training peak RSS at {big.n} <= 1.5 x at {small.n}: {t_big:.0f} MB vs {t_small:.0f} MB "
                   f"({t_big / t_small:.2f}x)", t_big <= 1.5 * t_small))
    checks.append((f"training peak RSS at {big.n} under 4 GiB: {t_big:.0f} MB", t_big < 4 * 1024))
    for name in STAGES:
        a, b = small.stages[name].rate, big.stages[name].rate
        ca, cb = small.stages[name].cpu_rate, big.stages[name].cpu_rate
        if args.gate == "wall":
            text = f"{b:.1f} vs {a:.1f} gal/s ({b / a:.2f}x; per CPU-second {cb / ca:.2f}x)"
            ok = b >= 0.8 * a
        else:
            text = f"{cb:.1f} vs {ca:.1f} gal/CPU-s ({cb / ca:.2f}x; per wall second {b / a:.2f}x)"
            ok = cb >= 0.8 * ca
        checks.append((f"{name} throughput at {big.n} within 20% of {small.n}: {text}", ok))
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
                   help="where the work directories n<size>/ go (replaced if present; default /tmp/galpipe-scale)")
    p.add_argument("--keep", action="store_true", help="keep the work directories")
    p.add_argument("--gate", choices=("wall", "cpu"), default="wall",
                   help="throughput the 20%% check compares: galaxies per wall second (default) or per "
                        "CPU-second (for a machine shared with other work)")
    args = p.parse_args(argv)
    args.slurm_state = slurm_probe_state()
    print(f"SLURM: {args.slurm_state}", flush=True)
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
            print_size(results[-1])
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
