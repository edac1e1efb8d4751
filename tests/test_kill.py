"""Kill anywhere: SIGKILL the whole workflow inside every stage, rerun, get the clean run's outputs.

The slow test runs the tiny simulated workflow once uninterrupted (the
reference, shared with ``test_determinism`` and ``test_workflow``), then drives a second working
directory through a chain of kills: for each stage (catalogue, cutouts,
normalise, split, train, evaluate) Snakemake's process group is killed with
SIGKILL at a point inside that stage (a seeded random delay from the stage's
start, or an observable point: some cutouts written, a training checkpoint
committed, the first figure saved; cutouts and train, whose reruns reuse what a
killed run left, are killed once more in that rerun), each time followed by
``snakemake --unlock`` and a rerun with ``--rerun-incomplete``, so every cycle
re-executes only from the killed stage on.  The final outputs must be
byte-identical to the reference (wall-clock fields excepted; the killed runs use
another ``PYTHONHASHSEED`` than the reference) and no temporary
file or training checkpoint may be left behind.

Set ``GALPIPE_KILL_SEED`` to draw other kill points; the plan and where each
kill landed are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from nn_fixtures import synthetic_galaxies, write_split_parquet
from robust_fixtures import (
    ROBUST_TINY,
    STAGES,
    KillPoint,
    Run,
    artifact_digests,
    check_ok,
    compare_digests,
    incomplete_markers,
    leftovers,
    reference_run,
    run_workflow,
    unlock,
    write_config,
)

from galpipe.config import resolve_experiments, validate_config
from galpipe.io.atomic import atomic_path, remove_stale_temps
from galpipe.stages import experiment_params

REPO = Path(__file__).resolve().parents[1]
#: ``PYTHONHASHSEED`` of the killed runs (the reference runs with 0; users do not fix it), so the
#: byte-identical final outputs also show that they do not depend on it.
HASH_SEED = 1


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Run]:
    return reference_run(tmp_path_factory)


def _count(workdir: Path, pattern: str) -> int:
    return sum(1 for _ in workdir.glob(pattern))


def kill_plan(rng: random.Random, durations: dict[str, float]) -> list[KillPoint]:
    """Kill points in workflow order (delays scaled by the reference durations).

    One seeded random point inside each stage that writes its outputs in one go (catalogue,
    normalise, split); an observable point (cutouts written, a checkpoint committed, a figure
    saved) inside each stage that leaves partial state, and for cutouts and train, whose rerun
    reuses that state (cached cutouts, the checkpoint), a random point in that rerun too (drawn
    from the first third of the stage, as the rerun is shorter than the reference's run).
    """

    def delayed(stage: str, upto: float = 0.7) -> KillPoint:
        return KillPoint(stage, delay=rng.uniform(0.05, upto) * durations[stage])

    k = rng.randint(5, 60)
    return [
        delayed("catalogue"),
        KillPoint("cutouts", ready=lambda wd: _count(wd, "resources/cutouts/*/*.fits") >= k,
                  label=f"cutouts after {k} FITS files"),
        delayed("cutouts", upto=0.35),
        delayed("normalise"),
        delayed("split"),
        KillPoint("train", ready=lambda wd: _count(wd, "results/checkpoints/*/checkpoint.json") > 0,
                  label="train after its first checkpoint"),
        delayed("train", upto=0.35),
        KillPoint("evaluate", ready=lambda wd: _count(wd, "results/evaluation/*/figures/*.png") > 0,
                  label="evaluate after its first figure"),
    ]


def _live_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that still run (zombies awaiting a reaper do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: ask the kernel whether the group still exists
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    live = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            live.append(int(stat.parent.name))
    return live


def _group_gone(pgid: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while _live_members(pgid):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def _remove_lock(workdir: Path) -> None:
    """Exactly what ``snakemake --unlock`` does: delete the stale lock files of a killed run."""
    for p in (workdir / ".snakemake" / "locks").glob("*.lock"):
        p.unlink()


@pytest.mark.slow
def test_kill_anywhere_then_rerun_gives_the_clean_outputs(
    reference: tuple[Path, Run], tmp_path_factory: pytest.TempPathFactory
) -> None:
    ref_dir, ref_run = reference
    seed = int(os.environ.get("GALPIPE_KILL_SEED", "20261129"))
    plan = kill_plan(random.Random(seed), ref_run.durations)
    wd = tmp_path_factory.mktemp("killed")
    write_config(wd, ROBUST_TINY)
    landed: dict[str, int] = dict.fromkeys(STAGES, 0)
    report = [f"kill seed {seed}; reference stage durations "
              + ", ".join(f"{s} {ref_run.durations[s]:.1f}s" for s in STAGES)]
    first = True
    resumed = False  # some rerun continued training from a checkpoint of a killed run
    for point in plan:
        for attempt in range(3):
            # A stage the previous attempt finished is forced to run again, so the kill lands in it.
            run = run_workflow(wd, *(("--forcerun", point.stage) if attempt else ()), kill=point,
                               hash_seed=HASH_SEED)
            resumed = resumed or "resuming from" in run.text
            report.append(f"{point.describe():34s} -> killed={run.killed} after {run.kill_after or 0:.2f}s, "
                          f"running {sorted(run.running_at_kill)} ({run.seconds:.1f}s)")
            if not run.killed:  # the workflow ended before the kill point
                check_ok(run, f"run meant to be killed at {point.describe()}")
            else:
                assert run.returncode == -signal.SIGKILL, run.text[-3000:]
                assert _group_gone(run.pid), "a job of the killed workflow survived SIGKILL of its process group"
                for stage in run.running_at_kill & set(STAGES):
                    landed[stage] += 1
                if first:
                    # A killed Snakemake leaves its lock: a plain rerun refuses, naming --unlock.
                    blocked = run_workflow(wd, hash_seed=HASH_SEED)
                    assert blocked.returncode != 0
                    assert "--unlock" in blocked.text, blocked.text[-3000:]
                    check_ok(unlock(wd), "snakemake --unlock")
                    first = False
                else:
                    _remove_lock(wd)
            if point.stage in run.running_at_kill:
                break
            if point.delay is not None:  # missed: the stage ran faster than in the reference
                point = KillPoint(point.stage, delay=point.delay / 3)
    final = run_workflow(wd, hash_seed=HASH_SEED)
    check_ok(final, "rerun after the last kill")
    report.append(f"final rerun: {final.seconds:.1f}s")
    print("\n".join(report))
    missed = [s for s in STAGES if not landed[s]]
    assert not missed, f"no kill landed inside stage(s) {missed}:\n" + "\n".join(report)
    assert resumed, "no rerun resumed training from the checkpoint of a killed run"
    problems = compare_digests(artifact_digests(ref_dir), artifact_digests(wd))
    assert not problems, "outputs differ from the uninterrupted run:\n" + "\n".join(problems + report)
    assert not leftovers(wd), leftovers(wd)
    assert not incomplete_markers(wd), incomplete_markers(wd)
    nothing = run_workflow(wd, "-n", hash_seed=HASH_SEED)
    assert "Nothing to be done" in nothing.text, nothing.text[-3000:]


# --------------------------------------------------------------------------- fast checks of the mechanisms
_WRITER = """
import sys, time
from galpipe.io.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half a file")
    print(tmp, flush=True)
    time.sleep(60)
"""


def _start_writer(target: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.is_file() and tmp.parent == target.parent
    return proc, tmp


def test_temp_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path: Path) -> None:
    target = tmp_path / "out" / "table.parquet"
    dead, dead_tmp = _start_writer(target)
    live, live_tmp = _start_writer(tmp_path / "out" / "other.parquet")
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        assert dead_tmp.exists() and not target.exists()  # what SIGKILL leaves behind
        removed = remove_stale_temps(target.parent)
        assert removed == [dead_tmp]
        assert not dead_tmp.exists()
        assert live_tmp.exists(), "the temporary file of a live writer must never be touched"
    finally:
        live.kill()
        live.wait()
    # a fresh process's first atomic write into the folder sweeps it
    dead, dead_tmp = _start_writer(target)
    dead.kill()
    dead.wait()
    code = f"from galpipe.io.atomic import atomic_write_text; atomic_write_text({str(target)!r}, 'ok')"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert target.read_text() == "ok"
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.parquet"], list(target.parent.iterdir())


def test_atomic_path_leaves_nothing_on_error(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def _tiny_experiment(shape: tuple[int, int, int]) -> dict:
    cfg = validate_config({
        "seed": 3, "cutout_size": shape[0], "bands": ["g", "r"],
        "training": {"epochs": 2, "batch_size": 16, "early_stopping_patience": 0},
        "experiments": {"tiny": {"architecture": [{"type": "conv2d", "filters": 3}, "relu", "global_avg_pool"]}},
    })
    exps = resolve_experiments(cfg, [REPO / "config" / "architectures"])
    return experiment_params(cfg, exps["tiny"])


def test_killed_between_last_checkpoint_and_save_resumes_to_identical_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The narrowest train window: every epoch checkpointed, the model not yet saved."""
    import galpipe.nn.persist as persist
    from galpipe.stages.train import run as train_experiment

    x, y = synthetic_galaxies(96, size=12, channels=2, seed=1)
    train = write_split_parquet(tmp_path / "train.parquet", x[:64], y[:64], bands=("g", "r"))
    val = write_split_parquet(tmp_path / "validation.parquet", x[64:], y[64:], bands=("g", "r"),
                              objids=np.arange(5000, 5032))
    exp = _tiny_experiment((12, 12, 2))
    ckpt = tmp_path / "checkpoints"
    train_experiment(exp, train, val, tmp_path / "clean" / "model.json", name="tiny", checkpoint_root=ckpt,
                     progress=False)
    assert not any(ckpt.iterdir())  # removed after success

    class Killed(BaseException):
        pass

    def die(*args: object, **kwargs: object) -> None:
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(persist, "save_model", die)
        with pytest.raises(Killed):
            train_experiment(exp, train, val, tmp_path / "resumed" / "model.json", name="tiny",
                             checkpoint_root=ckpt, progress=False)
    (left,) = list(ckpt.iterdir())
    assert json.loads((left / "checkpoint.json").read_text())["epochs_done"] == 2
    train_experiment(exp, train, val, tmp_path / "resumed" / "model.json", name="tiny", checkpoint_root=ckpt,
                     progress=False)
    assert not any(ckpt.iterdir())
    with np.load(tmp_path / "clean" / "weights.npz") as a, np.load(tmp_path / "resumed" / "weights.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    hist = [pd.read_csv(tmp_path / d / "history.csv").drop(columns=["seconds"]) for d in ("clean", "resumed")]
    pd.testing.assert_frame_equal(hist[0], hist[1])
