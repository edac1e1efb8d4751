"""The built distribution works on its own: sdist -> wheel -> a fresh venv outside the checkout.

The schemas and the architecture presets are package data (``galpipe/schemas``,
``galpipe/architectures``; the checkout's ``workflow/schemas`` and
``config/architectures`` are symlinks to them).  This builds the sdist and, from
it, the wheel (offline: ``--no-build-isolation``, so setuptools comes from the
test environment), installs only galpipe itself into a new venv in a temp dir
(its dependencies are made visible from the test environment's site-packages
through a ``.pth`` file), and drives the installed ``galpipe`` command from a
temp dir where the checkout is not importable: ``validate-config`` on
``config/sdss.yaml`` (no ``architectures/`` folder beside it) and a tiny
simulated run through the stage commands.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DATA = {  # checkout path the workflow/users read -> path inside the wheel
    **{f"workflow/schemas/{n}": f"galpipe/schemas/{n}" for n in ("config.schema.yaml", "sdss.schema.yaml")},
    **{
        f"config/architectures/{p.name}": f"galpipe/architectures/{p.name}"
        for p in sorted((REPO / "galpipe" / "architectures").glob("*.yaml"))
    },
}

pytestmark = pytest.mark.slow

TINY = {
    "source": "simulated",
    "seed": 3,
    "bands": ["g", "r"],
    "cutout_size": 32,
    "shards": 1,
    "simulated": {"n_galaxies": 36},
    "split": {"row_group_size": 16},
    "training": {"epochs": 1, "batch_size": 16, "early_stopping_patience": 0, "augment": False},
    "experiments": {"tiny": {"architecture": "small_cnn"}},  # a preset: resolved from package data
    "evaluate": {"n_bootstrap": 10, "gallery_size": 2},
}


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True,
         timeout: float = 120) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n"
                             f"{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


def _copy_project(dest: Path) -> None:
    """What a fresh clone gives the build backend, without writing build files into the checkout."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "setup.py", "setup.cfg"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)
    # symlinks=True: a symlink inside the package would dangle here, so the package must hold real files
    shutil.copytree(REPO / "galpipe", dest / "galpipe", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build sdist, then the wheel from that sdist (what ``python -m build`` does)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "dist"
    _copy_project(src)
    out.mkdir()
    res = _run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                f"print(b.build_sdist({str(out)!r}))"], cwd=src, check=False)
    if res.returncode != 0:
        raise AssertionError("building the sdist failed; the test environment needs the build backend "
                             f"of [build-system] (setuptools>=77, in the 'test' extra):\n{res.stderr[-4000:]}")
    sdist = out / res.stdout.strip().splitlines()[-1]
    _run([sys.executable, "-m", "pip", "wheel", str(sdist), "--no-deps", "--no-build-isolation",
          "--no-index", "--quiet", "-w", str(out)], cwd=tmp)
    (wheel,) = out.glob("galpipe-*.whl")
    return {"tmp": tmp, "sdist": sdist, "wheel": wheel}


@pytest.fixture(scope="module")
def venv(dist: dict[str, Path]) -> dict[str, object]:
    """A fresh venv with only galpipe installed (from the wheel); dependencies seen through a .pth."""
    tmp = dist["tmp"]
    root = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=tmp)
    python = root / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=tmp).stdout.strip())
    # plain path lines: the host's own .pth files (among them galpipe's editable-install hook) are not run
    host = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (purelib / "zz_host_dependencies.pth").write_text("".join(f"{p}\n" for p in host))
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
          "--quiet", str(dist["wheel"])], cwd=tmp)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PATH=f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(root),
               PYTHONNOUSERSITE="1", PYTHONHASHSEED="0")
    work = tmp / "work"  # cwd of every command: no galpipe/ and no config/architectures/ here
    work.mkdir()
    return {"root": root, "python": python, "galpipe": root / "bin" / "galpipe", "env": env, "work": work}


def _galpipe(venv: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run([str(venv["galpipe"]), *args], cwd=venv["work"], env=venv["env"], check=check)


def test_checkout_package_data_paths_are_links_into_the_package() -> None:
    for checkout_path, package_path in PACKAGE_DATA.items():
        assert (REPO / checkout_path).resolve() == (REPO / package_path).resolve(), checkout_path
        assert not (REPO / package_path).is_symlink(), f"{package_path} must be the real file"
    assert (REPO / "config" / "architectures").is_symlink()


def test_sdist_and_wheel_carry_the_package_data(dist: dict[str, Path]) -> None:
    with zipfile.ZipFile(dist["wheel"]) as zf:
        names = set(zf.namelist())
        for checkout_path, package_path in PACKAGE_DATA.items():
            assert package_path in names, f"{package_path} missing from the wheel"
            assert zf.read(package_path) == (REPO / checkout_path).read_bytes(), package_path
        assert "galpipe/testing/fakeserver.py" in names
    with tarfile.open(dist["sdist"]) as tf:
        top = tf.getnames()[0].split("/")[0]
        for checkout_path, package_path in PACKAGE_DATA.items():
            member = tf.getmember(f"{top}/{package_path}")
            assert member.isfile(), package_path
            assert tf.extractfile(member).read() == (REPO / checkout_path).read_bytes(), package_path


def test_installed_galpipe_comes_from_the_wheel(venv: dict) -> None:
    res = _run([str(venv["python"]), "-c",
                "import galpipe, galpipe.config as c; print(galpipe.__file__); print(c.builtin_presets())"],
               cwd=venv["work"], env=venv["env"])
    module, presets = res.stdout.split()
    root = Path(venv["root"]).resolve()
    assert Path(module).resolve().is_relative_to(root), f"galpipe imported from {module}, not the wheel"
    assert Path(presets).resolve().is_relative_to(root)
    assert not Path(module).resolve().is_relative_to(REPO)


def test_validate_config_uses_the_packaged_schemas_and_presets(venv: dict) -> None:
    work = Path(venv["work"])
    sdss_cfg = yaml.safe_load((REPO / "config" / "sdss.yaml").read_text())
    shutil.copy(REPO / "config" / "sdss.yaml", work / "sdss.yaml")
    res = _galpipe(venv, "validate-config", "--config", "sdss.yaml")
    assert "valid" in res.stdout
    # the sdss: section is validated against the packaged sdss.schema.yaml
    bad = {**sdss_cfg, "sdss": {**sdss_cfg["sdss"], "no_such_sdss_key": 1}}
    (work / "bad_sdss.yaml").write_text(yaml.safe_dump(bad))
    res = _galpipe(venv, "validate-config", "--config", "bad_sdss.yaml", check=False)
    assert res.returncode != 0 and "no_such_sdss_key" in res.stderr + res.stdout
    # a preset name resolves from the package data; an unknown one lists the built-in presets
    (work / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    assert "tiny" in _galpipe(venv, "validate-config", "--config", "tiny.yaml").stdout
    unknown = {**TINY, "experiments": {"x": {"architecture": "no_such_preset"}}}
    (work / "unknown.yaml").write_text(yaml.safe_dump(unknown))
    res = _galpipe(venv, "validate-config", "--config", "unknown.yaml", check=False)
    assert res.returncode != 0 and "small_cnn" in res.stderr + res.stdout
    # a config's own architectures/ folder still comes first
    (work / "architectures").mkdir()
    (work / "architectures" / "small_cnn.yaml").write_text(
        yaml.safe_dump({"description": "local", "architecture": [{"type": "bogus_layer"}]}))
    try:
        res = _galpipe(venv, "validate-config", "--config", "tiny.yaml", check=False)
        assert res.returncode != 0 and "bogus_layer" in res.stderr + res.stdout
    finally:
        shutil.rmtree(work / "architectures")


def test_tiny_simulated_run_through_the_installed_cli(venv: dict) -> None:
    work = Path(venv["work"])
    (work / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    cfg = ("--config", "tiny.yaml")
    _galpipe(venv, "catalogue", *cfg, "--output", "results/catalogue/catalogue.parquet",
             "--shard-dir", "results/catalogue/shards")
    shard = "results/catalogue/shards/0000.parquet"
    _galpipe(venv, "cutouts", *cfg, "--shard", shard, "--output", "results/cutouts/0000.parquet")
    _galpipe(venv, "normalise", *cfg, "--manifest", "results/cutouts/0000.parquet", "--shard", shard,
             "--output", "results/normalised/0000.parquet", "--rejects", "results/normalised/0000.rejects.parquet")
    _galpipe(venv, "split", *cfg, "--output-dir", "results/split", "results/normalised/0000.parquet")
    _galpipe(venv, "train", *cfg, "--experiment", "tiny", "--train", "results/split/train.parquet",
             "--validation", "results/split/validation.parquet", "--output-dir", "results/models/tiny")
    model = work / "results" / "models" / "tiny"
    assert (model / "model.json").is_file() and (model / "weights.npz").is_file()


# --------------------------------------------------------------------------- shipped pretrained models
SHIPPED_MODELS = REPO / "galpipe" / "models"
GZ1_IMAGES = REPO.parent / "shared" / "data" / "gz1-sdss-jpeg"


def _shipped_in_checkout() -> list[str]:
    """Names of the models shipped in this checkout (galpipe/models/<name>/model.json)."""
    return sorted(p.parent.name for p in SHIPPED_MODELS.glob("*/model.json") if not p.parent.name.startswith("."))


def test_wheel_carries_every_shipped_model(dist: dict[str, Path]) -> None:
    from galpipe.models import SHIPPED_FILES

    with zipfile.ZipFile(dist["wheel"]) as zf:
        names = set(zf.namelist())
        assert "galpipe/models/__init__.py" in names
        assert "gz1" in _shipped_in_checkout()  # the pretrained model ships: the loop below checks something
        for model in _shipped_in_checkout():
            for f in SHIPPED_FILES:
                member = f"galpipe/models/{model}/{f}"
                assert member in names, f"{member} missing from the wheel (pyproject package-data 'models/*/*')"
                assert zf.read(member) == (SHIPPED_MODELS / model / f).read_bytes(), member


def test_installed_galpipe_predicts_with_the_shipped_gz1_by_name(venv: dict) -> None:
    """``galpipe predict --model gz1`` from the wheel, outside the checkout, on 5 real GZ1 JPEGs."""
    # gz1 ships with galpipe: its absence is a defect, not a missing resource
    assert (SHIPPED_MODELS / "gz1" / "model.json").is_file(), f"no shipped model at {SHIPPED_MODELS / 'gz1'}"
    if not (GZ1_IMAGES / "labels.csv").is_file():
        pytest.skip(f"real GZ1 SDSS JPEG set not found at {GZ1_IMAGES} (only on CI/dev machines)")
    import pandas as pd

    from galpipe.predict import predict_input

    work = Path(venv["work"])
    images = work / "gz1_five"
    images.mkdir(exist_ok=True)
    rows = pd.read_csv(SHIPPED_MODELS / "gz1" / "test_split.csv").head(5)
    for image in rows["image"]:
        shutil.copy(GZ1_IMAGES / image, images / Path(image).name)
    res = _galpipe(venv, "predict", "--model", "gz1", "gz1_five", "--output", "gz1_five.csv")
    assert "5 predictions" in res.stdout
    got = pd.read_csv(work / "gz1_five.csv").sort_values("objid").reset_index(drop=True)
    # the installed copy of the model was used, not the checkout's
    from astropy.table import Table

    model_dir = Path(Table.read(work / "gz1_five.ecsv", format="ascii.ecsv").meta["model_dir"]).resolve()
    assert model_dir.is_relative_to(Path(venv["root"]).resolve()) and not model_dir.is_relative_to(REPO)
    # the same classes and probabilities as the checkout's predict on the same files
    want = predict_input(SHIPPED_MODELS / "gz1", images, work / "checkout_five.csv", show_progress=False)
    want = want.sort_values("objid").reset_index(drop=True)
    assert got["objid"].tolist() == [int(o) for o in want["objid"]] == sorted(rows["objid"])
    assert got["pred"].tolist() == want["pred"].tolist()
    for col in [c for c in want.columns if c.startswith("p_")]:
        np.testing.assert_allclose(got[col].to_numpy(), want[col].to_numpy(), rtol=2e-5, atol=1e-6)
