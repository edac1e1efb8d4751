"""Every failure a user can cause prints one line naming the cause and the input.

``galpipe <command>`` turns a :class:`~galpipe.errors.GalpipeError` or an
:class:`OSError` (disk full, permission denied, read-only file system, a file
where a folder should be) into ``galpipe <command>: error: <cause> (<file>)`` on
stderr and exit 1, with no traceback unless ``--debug``; any other exception is
a bug and keeps its traceback.  The Snakemake adapters (``galpipe.smk.run_stage``)
do the same, naming the rule.  Bad coordinates in a catalogue given to
``galpipe predict`` are refused before astropy sees them; bad options of the
stand-in server end with argparse's one error line; a failed cutouts stage
leaves its complete manifest beside the declared output.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import galpipe.catalogue
from galpipe.catalogue import check_catalogue, check_coordinates
from galpipe.cli import main
from galpipe.errors import DataError
from galpipe.stages.cutouts import failed_manifest_path

REPO = Path(__file__).resolve().parents[1]
SIM = {"source": "simulated", "seed": 5, "cutout_size": 24, "shards": 1, "simulated": {"n_galaxies": 24}}


def _err_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """stderr's error lines (log lines of the stage aside); there is no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if ": error: " in line or line.startswith("galpipe error")]


@pytest.fixture
def sim_config(tmp_path: Path) -> Path:
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(SIM), encoding="utf-8")
    return path


def _catalogue_args(config: Path, out: Path) -> list[str]:
    return ["catalogue", "--config", str(config), "--output", str(out / "cat.parquet"),
            "--shard-dir", str(out / "shards")]


# --------------------------------------------------------------------------- OSError in the CLI
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.ENOENT],
                         ids=["ENOSPC", "EACCES", "EROFS", "ENOENT"])
def test_os_error_is_one_line_naming_the_file(code: int, sim_config: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    def full(df: pd.DataFrame, path: os.PathLike[str], metadata: dict) -> Path:
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(galpipe.catalogue, "write_table", full)
    out = tmp_path / "results"
    assert main(_catalogue_args(sim_config, out)) == 1
    assert _err_lines(capsys) == [f"galpipe catalogue: error: {os.strerror(code)} ({out / 'cat.parquet'})"]
    assert {errno.ENOSPC: "No space left on device", errno.EACCES: "Permission denied",
            errno.EROFS: "Read-only file system", errno.ENOENT: "No such file or directory"}[code] == os.strerror(code)


def test_debug_shows_the_traceback(sim_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(df: pd.DataFrame, path: os.PathLike[str], metadata: dict) -> Path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(galpipe.catalogue, "write_table", full)
    with pytest.raises(OSError, match="No space left on device"):
        main(["--debug", *_catalogue_args(sim_config, tmp_path)])
    monkeypatch.setenv("GALPIPE_DEBUG", "1")
    with pytest.raises(OSError, match="No space left on device"):
        main(_catalogue_args(sim_config, tmp_path))


def test_a_bug_keeps_its_traceback(sim_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception that is neither a GalpipeError nor an OSError is a bug: not hidden behind one line."""
    def broken(df: pd.DataFrame, path: os.PathLike[str], metadata: dict) -> Path:
        raise KeyError("some_internal_key")

    monkeypatch.setattr(galpipe.catalogue, "write_table", broken)
    with pytest.raises(KeyError) as info:
        main(_catalogue_args(sim_config, tmp_path))
    assert any("galpipe catalogue: internal error: this is a bug in galpipe" in n for n in info.value.__notes__)


def test_a_file_where_the_output_folder_should_be(sim_config: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    assert main(_catalogue_args(sim_config, blocker)) == 1
    assert _err_lines(capsys) == [f"galpipe catalogue: error: File exists and is not a folder ({blocker})"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into a read-only folder anyway (the monkeypatched EACCES case covers it)")
def test_read_only_output_folder(sim_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main(_catalogue_args(sim_config, out)) == 1
    finally:
        out.chmod(0o755)
    (line,) = _err_lines(capsys)
    assert line.startswith("galpipe catalogue: error: Permission denied (") and str(out) in line


def test_missing_input_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "nowhere.yaml"
    assert main(["validate-config", "--config", str(config)]) == 1
    (line,) = _err_lines(capsys)
    assert line.startswith("galpipe validate-config: error: ") and str(config) in line


# --------------------------------------------------------------------------- OSError in a Snakemake job
def test_run_stage_turns_an_os_error_into_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from galpipe.smk import run_stage

    log = tmp_path / "cutouts.log"
    job = SimpleNamespace(log=[str(log)], threads=1, rule="cutouts")
    target = tmp_path / "results" / "cutouts" / "0000.parquet"

    def stage() -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    with pytest.raises(SystemExit) as info:
        run_stage(job, stage)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"galpipe error in rule cutouts: No space left on device ({target})" in err.splitlines()
    assert f"cutouts failed: No space left on device ({target})" in log.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- bad coordinates
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A model trained for one epoch by the stages, its config and a few catalogue rows (a few seconds)."""
    from galpipe.config import resolve_experiments, validate_config
    from galpipe.stages import cutout_cache_dir, experiment_params, stage_params
    from galpipe.stages.catalogue import run as run_catalogue
    from galpipe.stages.cutouts import run as run_cutouts
    from galpipe.stages.normalise import run as run_normalise
    from galpipe.stages.split import run as run_split
    from galpipe.stages.train import run as run_train

    wd = tmp_path_factory.mktemp("tiny")
    raw = {**SIM, "cutout_size": 16, "training": {"epochs": 1, "batch_size": 16, "early_stopping_patience": 0},
           "experiments": {"tiny": {"architecture": ["global_avg_pool"]}}}
    cfg = validate_config(raw)
    (wd / "sim.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    r = wd / "results"
    run_catalogue(stage_params(cfg, "catalogue"), r / "catalogue.parquet", [r / "shard.parquet"])
    run_cutouts(stage_params(cfg, "cutouts"), r / "shard.parquet", r / "manifest.parquet",
                cutout_cache_dir(cfg, root=wd / "cache"))
    run_normalise(stage_params(cfg, "normalise"), r / "manifest.parquet", r / "shard.parquet",
                  r / "normalised.parquet", r / "rejects.parquet")
    splits = {s: r / f"{s}.parquet" for s in ("train", "validation", "test")}
    run_split(stage_params(cfg, "split"), [r / "normalised.parquet"], splits, r / "summary.json")
    (name, exp), = resolve_experiments(cfg, []).items()
    run_train(experiment_params(cfg, exp), splits["train"], splits["validation"], r / "model" / "model.json",
              name=name, checkpoint_root=wd / "checkpoints", progress=False)
    rows = pd.read_parquet(r / "catalogue.parquet").head(3)
    return SimpleNamespace(model=r / "model", config=wd / "sim.yaml", rows=rows)


@pytest.mark.parametrize(("column", "value", "problem"), [
    ("ra", "abc", "'abc' is not a number (degrees)"),
    ("dec", 95.0, "95.0 is outside [-90, 90] degrees"),
    ("ra", 360.0, "360.0 is outside [0, 360) degrees"),
    ("ra", -0.5, "-0.5 is outside [0, 360) degrees"),
    ("dec", np.nan, "nan is missing while ra has a value (give both or neither)"),
], ids=["ra-abc", "dec-95", "ra-360", "ra-negative", "dec-missing"])
def test_predict_refuses_bad_coordinates(tiny_model: SimpleNamespace, tmp_path: Path, column: str, value: object,
                                         problem: str, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    rows = tiny_model.rows.copy()
    if isinstance(value, str):
        rows[column] = rows[column].astype(object)
    rows.loc[rows.index[1], column] = value
    csv = tmp_path / "catalogue.csv"
    rows.to_csv(csv, index=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "pred.csv"
    assert main(["predict", "--model", str(tiny_model.model), str(csv), "--config", str(tiny_model.config),
                 "--output", str(out)]) == 1
    objid = int(rows["objid"].iloc[1])
    assert _err_lines(capsys) == [f"galpipe predict: error: catalogue {csv}: objid {objid} (row 2): "
                                  f"column {column!r}: {problem}"]
    assert not out.exists() and not (tmp_path / "resources").exists()  # refused before any cutout


def test_catalogue_coordinates_contract() -> None:
    cat = pd.DataFrame({"objid": [3, 1, 2], "ra": ["10.5", "0", "359.9"], "dec": [-90, 90, 0],
                        "label": ["a", "b", "a"]})
    out = check_catalogue(cat)
    assert out["ra"].dtype == np.float64 and out["dec"].dtype == np.float64
    assert out["ra"].tolist() == [0.0, 359.9, 10.5] and out["dec"].tolist() == [90.0, 0.0, -90.0]
    # no coordinates at all (the images source): allowed, unless the source cuts at the position
    unknown = cat.assign(ra=np.nan, dec=np.nan)
    assert check_catalogue(unknown)["ra"].isna().all()
    with pytest.raises(DataError, match=r"^shard x: objid 3 \(row 1\): column 'ra': nan is missing: this source "
                                        r"makes each cutout at the galaxy's position \(3 rows like this\)$"):
        check_coordinates(unknown, where="shard x", required=True)
    with pytest.raises(DataError, match=r"objid 2 \(row 3\): column 'dec': inf is outside \[-90, 90\] degrees"):
        check_catalogue(cat.assign(dec=[0.0, 1.0, np.inf]))
    with pytest.raises(DataError, match=r"column 'ra' must hold numbers \(degrees\), got bool"):
        check_catalogue(cat.assign(ra=[True, False, True]))


# --------------------------------------------------------------------------- the stand-in server's options
BAD_SERVER_OPTIONS = [
    (["--frame-shape", "0,0"], "argument --frame-shape: '0,0': rows and columns must each be in 16..4096"),
    (["--frame-shape", "12"], "argument --frame-shape: '12': expected ROWS,COLUMNS, two integers"),
    (["--port", "70000"], "argument --port: 70000 is out of range: expected 0..65535"),
    (["--galaxies", "0"], "argument --galaxies: 0 is out of range: expected 1..1000000"),
    (["--seed", "-1"], "argument --seed: -1 is out of range: expected >= 0"),
    (["--latency", "nan"], "argument --latency: nan is out of range: expected a finite number >= 0"),
    (["--fault-rate", "1.5"], "argument --fault-rate: 1.5 is out of range: expected a finite number in 0..1"),
    (["--fault-kinds", "teapot"], "argument --fault-kinds: 'teapot': expected a comma list of some of "
                                  "500, 503, slow, truncated, corrupt, html200"),
    (["--galaxies-per-field", "0"], "argument --galaxies-per-field: 0 is out of range: expected >= 1"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_SERVER_OPTIONS, ids=["=".join(a) for a, _ in BAD_SERVER_OPTIONS])
def test_fake_skyserver_bad_options(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fake-skyserver", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == f"galpipe fake-skyserver: error: {message}"
    assert err.startswith("usage: galpipe fake-skyserver")


def test_fake_skyserver_module_frame_shape_zero() -> None:
    res = subprocess.run([sys.executable, "-m", "galpipe.testing.fakeserver", "--frame-shape", "0,0", "--port", "0"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and not res.stdout
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert errors == ["galpipe fake-skyserver: error: argument --frame-shape: '0,0': rows and columns must each "
                      "be in 16..4096"]


def test_fake_skyserver_busy_port(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as info:
            main(["fake-skyserver", "--port", str(port), "--galaxies", "4"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [f"galpipe fake-skyserver: error: cannot listen on 127.0.0.1:{port}: "
                                f"{os.strerror(errno.EADDRINUSE)}"]


# --------------------------------------------------------------------------- a failed cutouts stage
def _image_set(root: Path) -> Path:
    """Six distinct JPEGs, two of them corrupt, and their labels CSV; returns the config file."""
    img = root / "images"
    img.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        name = f"g{i}.jpg"
        if i in (1, 4):
            (img / name).write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG, number %d" % i)
        else:
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(img / name)
        rows.append(f"{i},{'spiral' if i % 2 else 'elliptical'},{name}")
    (root / "labels.csv").write_text("objid,label,image\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return img


def _images_config(root: Path, img: Path, max_reject: float) -> Path:
    path = root / "images.yaml"
    path.write_text(yaml.safe_dump({
        "source": "images", "cutout_size": 16, "shards": 1, "max_reject_fraction": max_reject,
        "images": {"directory": str(img), "labels_csv": str(root / "labels.csv")}}), encoding="utf-8")
    return path


def test_failed_cutouts_keep_the_full_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    img = _image_set(tmp_path)
    strict = _images_config(tmp_path, img, 0.0)
    assert main(["catalogue", "--config", str(strict), "--output", "cat.parquet", "--shard-dir", "shards"]) == 0
    shard = next(Path("shards").glob("*.parquet"))
    manifest = Path("cutouts") / "0000.parquet"
    failed = failed_manifest_path(manifest)
    assert failed == Path("cutouts") / "0000.failed.parquet"
    capsys.readouterr()

    assert main(["cutouts", "--config", str(strict), "--shard", str(shard), "--output", str(manifest)]) == 1
    (line,) = _err_lines(capsys)
    assert line.startswith(f"galpipe cutouts: error: cutouts of shard {shard}: 2 of 6 galaxies failed, more than "
                           "max_reject_fraction=0.0; first: objid 1: image ")
    assert "most common reasons: 1 x image " in line and "g4.jpg" in line
    assert line.endswith(f"; every galaxy and reason: {failed}")
    assert not manifest.exists()
    full = pd.read_parquet(failed).set_index("objid")
    assert sorted(full.index) == list(range(6))
    assert sorted(full.index[full["status"] != "ok"]) == [1, 4]
    assert "g1.jpg" in full.loc[1, "reason"] and "g4.jpg" in full.loc[4, "reason"]
    assert (full.loc[[0, 2, 3, 5], "status"] == "ok").all()

    lenient = _images_config(tmp_path, img, 0.5)
    assert main(["cutouts", "--config", str(lenient), "--shard", str(shard), "--output", str(manifest)]) == 0
    assert len(pd.read_parquet(manifest)) == 6
    assert not failed.exists()  # a later success removes the failure's manifest
