"""Shared helpers of the robustness tests: a tiny workflow, a killable Snakemake runner, digests.

``reference_run`` runs the tiny simulated workflow once per test session (cached
here, so ``test_kill``, ``test_determinism`` and ``test_workflow`` share it).  :func:`run_workflow`
starts Snakemake in its own process group, timestamps every output line and
follows which rules are running, so a test can ``SIGKILL`` the whole group at a
chosen point inside a stage and know where the kill landed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"

#: The `.test/` config (snakemake-workflows convention), the smallest complete run: 90 simulated
#: galaxies, 32x32, 2 shards, 2 epochs, a tiny CNN and the catalogue-feature baseline (both train
#: with checkpoints, so kills inside train test resume).  The robustness tests and
#: tests/test_workflow.py use this one config, so they share one uninterrupted run
#: (:func:`reference_run`).
TEST_CONFIG = REPO / ".test" / "config" / "config.yaml"
ROBUST_TINY: dict = yaml.safe_load(TEST_CONFIG.read_text(encoding="utf-8"))

#: The stages a kill may land in, in workflow order.
STAGES = ("catalogue", "cutouts", "normalise", "split", "train", "evaluate")

#: Identical for every run: thread counts fix BLAS summation order, hence bit-identical weights.
THREAD_ENV = {"OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def workflow_env(hash_seed: int = 0) -> dict[str, str]:
    """Environment of a workflow run (``PYTHONHASHSEED`` and thread counts fixed)."""
    return {**os.environ, **THREAD_ENV, "PYTHONHASHSEED": str(hash_seed), "PYTHONUNBUFFERED": "1"}


def write_config(workdir: Path, cfg: dict) -> Path:
    """Write ``cfg`` to ``workdir/config/config.yaml``."""
    path = workdir / "config" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- running snakemake
_RULE_START = re.compile(r"^(?:local)?rule (\w+):$")
_JOBID = re.compile(r"^\s+jobid: (\d+)$")
_FINISHED = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)")


@dataclass
class Run:
    """Outcome of one Snakemake invocation."""

    returncode: int
    lines: list[tuple[float, str]]
    seconds: float
    #: Process id of Snakemake, also the id of its process group.
    pid: int = 0
    killed: bool = False
    #: Rules with a job running (started, not finished) when the kill was sent.
    running_at_kill: set[str] = field(default_factory=set)
    #: Seconds from the start of the target stage to the kill.
    kill_after: float | None = None
    #: Per rule: seconds from its first job start to its last job end (complete runs).
    durations: dict[str, float] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.lines)


class _Follower:
    """Reads Snakemake's output in a thread and tracks the running jobs."""

    def __init__(self, stream: io.TextIOBase, t0: float) -> None:
        self.t0 = t0
        self.lines: list[tuple[float, str]] = []
        self.running: dict[str, str] = {}  # jobid -> rule
        self.started: dict[str, float] = {}  # rule -> first start
        self.ended: dict[str, float] = {}  # rule -> last end
        self.lock = threading.Lock()
        self._pending: str | None = None
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: io.TextIOBase) -> None:
        for line in stream:
            now = time.monotonic() - self.t0
            with self.lock:
                self.lines.append((now, line))
                stripped = line.rstrip("\n")
                if m := _RULE_START.match(stripped):
                    self._pending = m.group(1)
                    self.started.setdefault(self._pending, now)
                elif (m := _JOBID.match(stripped)) and self._pending is not None:
                    self.running[m.group(1)] = self._pending
                    self._pending = None
                elif m := _FINISHED.match(stripped):
                    self.running.pop(m.group(1), None)
                    self.ended[m.group(2)] = now

    def running_rules(self) -> set[str]:
        with self.lock:
            return set(self.running.values())

    def stage_started(self, stage: str) -> float | None:
        with self.lock:
            return self.started.get(stage)


@dataclass
class KillPoint:
    """Where to SIGKILL a run: inside ``stage``, after ``delay`` seconds or once ``ready(workdir)``."""

    stage: str
    delay: float | None = None
    ready: Callable[[Path], bool] | None = None
    label: str = ""

    def describe(self) -> str:
        return self.label or (f"{self.stage} +{self.delay:.2f}s" if self.delay is not None else self.stage)


def run_workflow(workdir: Path, *args: str, kill: KillPoint | None = None, hash_seed: int = 0,
                 timeout: float = 600.0) -> Run:
    """Run the workflow in ``workdir`` (its own process group); optionally SIGKILL it inside a stage."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), "--cores", "2",
           "--configfile", str(workdir / "config" / "config.yaml"), "--rerun-incomplete", *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=workflow_env(hash_seed), start_new_session=True)
    assert proc.stdout is not None
    follower = _Follower(proc.stdout, t0)
    run = Run(returncode=0, lines=follower.lines, seconds=0.0, pid=proc.pid)
    try:
        if kill is not None:
            _kill_when(proc, follower, kill, workdir, run, t0 + timeout)
        proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"snakemake did not finish within {timeout} s:\n{run.text[-4000:]}") from None
    follower.thread.join(timeout=30)
    run.returncode = proc.returncode
    run.seconds = time.monotonic() - t0
    run.durations = {r: follower.ended[r] - s for r, s in follower.started.items() if r in follower.ended}
    return run


def _kill_when(proc: subprocess.Popen, follower: _Follower, kill: KillPoint, workdir: Path, run: Run,
               deadline: float) -> None:
    start = None
    while proc.poll() is None and time.monotonic() < deadline:
        if start is None:
            start = follower.stage_started(kill.stage)
            if start is None:
                time.sleep(0.005)
                continue
        elapsed = time.monotonic() - follower.t0 - start
        due = (kill.delay is not None and elapsed >= kill.delay) or (kill.ready is not None and kill.ready(workdir))
        if due:
            running = follower.running_rules()
            os.killpg(proc.pid, signal.SIGKILL)
            run.killed = True
            run.running_at_kill = running
            run.kill_after = elapsed
            return
        time.sleep(0.005)


def unlock(workdir: Path) -> Run:
    """``snakemake --unlock``: what a user runs after a killed run left its lock behind."""
    return run_workflow(workdir, "--unlock")


def check_ok(run: Run, what: str) -> None:
    if run.returncode != 0:
        raise AssertionError(f"{what}: snakemake failed ({run.returncode}):\n{run.text[-6000:]}")


# --------------------------------------------------------------------------- comparing outputs
#: Wall-clock fields, the only legitimate differences between two runs.
_TIMING_COLUMNS = {"history.csv": ["seconds"], "leaderboard.csv": ["train_seconds"]}
_TIMING_JSON = {"train_info.json": ["train_seconds"]}


def _normalised_bytes(path: Path) -> bytes:
    name = path.name
    if name in _TIMING_COLUMNS:
        df = pd.read_csv(path)
        return df.drop(columns=[c for c in _TIMING_COLUMNS[name] if c in df.columns]).to_csv(index=False).encode()
    if name in _TIMING_JSON:
        data = json.loads(path.read_text(encoding="utf-8"))
        for key in _TIMING_JSON[name]:
            data.pop(key, None)
        return json.dumps(data, sort_keys=True).encode()
    if name == "leaderboard.html":  # the leaderboard as HTML: drop the training-time column
        text = path.read_text(encoding="utf-8")
        return _strip_html_column(text, "training time (s)").encode()
    if name.endswith(".fits"):  # cutouts: DATE and the checksums that quote it are wall-clock
        from galpipe.io.cutout_fits import stable_fits_bytes

        return stable_fits_bytes(path)
    return path.read_bytes()


def _strip_html_column(text: str, header: str) -> str:
    head = re.search(r"<thead><tr>(.*?)</tr></thead>", text, flags=re.S)
    if head is None:
        return text
    cols = re.findall(r"<th>(.*?)</th>", head.group(1))
    if header not in cols:
        return text
    k = cols.index(header)

    def drop(m: re.Match[str]) -> str:
        cells = re.findall(r"<td[^>]*>.*?</td>", m.group(1), flags=re.S)
        return "<tr>" + "".join(c for i, c in enumerate(cells) if i != k) + "</tr>"

    return re.sub(r"<tr>((?:<td[^>]*>.*?</td>)+)</tr>", drop, text, flags=re.S)


def artifact_digests(workdir: Path) -> dict[str, str]:
    """SHA-256 of every file under ``results/`` and ``resources/`` (timing fields removed)."""
    out: dict[str, str] = {}
    for top in ("results", "resources"):
        root = workdir / top
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*")):
            if p.is_file():
                out[str(p.relative_to(workdir))] = hashlib.sha256(_normalised_bytes(p)).hexdigest()
    return out


def compare_digests(ref: dict[str, str], got: dict[str, str]) -> list[str]:
    """Human-readable differences between two :func:`artifact_digests` (empty when identical)."""
    problems = [f"missing: {k}" for k in sorted(set(ref) - set(got))]
    problems += [f"unexpected: {k}" for k in sorted(set(got) - set(ref))]
    problems += [f"differs: {k}" for k in sorted(set(ref) & set(got)) if ref[k] != got[k]]
    return problems


def leftovers(workdir: Path) -> list[str]:
    """Temporary or partial files left in results/ or resources/ (and stray checkpoints)."""
    found = []
    for top in ("results", "resources"):
        root = workdir / top
        if root.is_dir():
            found += [str(p.relative_to(workdir)) for p in root.rglob("*") if p.name.endswith(".tmp")]
    ckpt = workdir / "results" / "checkpoints"
    if ckpt.is_dir():
        found += [str(p.relative_to(workdir)) for p in ckpt.iterdir()]
    return found


def incomplete_markers(workdir: Path) -> list[str]:
    """Outputs Snakemake still marks as incomplete (decoded from .snakemake/incomplete)."""
    d = workdir / ".snakemake" / "incomplete"
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        try:
            out.append(base64.b64decode(p.name).decode())
        except (ValueError, UnicodeDecodeError):
            out.append(p.name)
    return sorted(out)


# --------------------------------------------------------------------------- the shared reference
_REFERENCE: dict[str, tuple[Path, Run]] = {}


def reference_run(factory: pytest.TempPathFactory) -> tuple[Path, Run]:
    """The uninterrupted run of :data:`ROBUST_TINY`, made once per test session.

    Shared by test_kill, test_determinism and test_workflow: a test may dry-run other configs
    in its folder (restoring ``config/config.yaml`` afterwards) but must not change its outputs.
    """
    if "ref" not in _REFERENCE:
        wd = factory.mktemp("reference")
        write_config(wd, ROBUST_TINY)
        run = run_workflow(wd)
        check_ok(run, "reference run")
        _REFERENCE["ref"] = (wd, run)
    return _REFERENCE["ref"]
