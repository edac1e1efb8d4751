"""Fine-tuning the shipped model against training from scratch, on few labels.

An astronomer has a few hundred labelled galaxies.  Does starting from the shipped
``gz1`` model (``training.init_from: gz1``) beat training the same network from random
weights on them?  Measured on the GZ1 images of the pipeline's own split
(``results/gz1-sdss-jpeg/split``, made by ``snakemake --configfile config/gz1-sdss-jpeg.yaml``):

* labels: a stratified ``--fraction`` (default 10%) of the TRAIN split, drawn per seed;
* scoring: the full TEST split (balanced accuracy with a 95% bootstrap interval);
  the best epoch is chosen on the full validation split, as the pipeline does;
* two tasks:

  - ``same``: elliptical vs spiral, the classes gz1 was trained on.  gz1 saw every
    train-split galaxy during its own training, so this measures what a user gets
    from the shipped weights on data like GZ1's, not transfer to unseen galaxies;
  - ``new``: elliptical vs face-on spiral vs edge-on disc (Galaxy Zoo 1's edge-on
    class, which gz1 merged into spiral).  The output layer is new (3 classes) and
    starts fresh; the rest is copied.

* arms: ``scratch`` (random initialisation), ``finetune`` (init_from gz1, every
  layer trained, a lower learning rate), ``frozen`` (init_from gz1, the convolutional
  stack frozen: only the dense head trains).

Every arm uses the gz1 experiment's training settings (rendering changes included) from
``config/gz1-sdss-jpeg.yaml``, ``--epochs`` at most with early stopping on validation.
OPENBLAS overrides are removed before NumPy is imported (see ``_benchenv``).

Usage: ``python benchmarks/bench_finetune.py [--fraction 0.1] [--seeds 0 1 2]
[--epochs 30] [--tasks same new] [--model gz1]``.  Needs the shared GZ1 data and the
split; exits 0 with a message when they are absent.
"""

from __future__ import annotations

from _benchenv import environment_note, reexec_without_openblas_overrides

reexec_without_openblas_overrides()

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "gz1-sdss-jpeg"
SPLIT = REPO / "results" / "gz1-sdss-jpeg" / "split"
CONFIG = REPO / "config" / "gz1-sdss-jpeg.yaml"
NEW_TASK = {"elliptical": "elliptical", "spiral_cw": "face_on_spiral", "spiral_acw": "face_on_spiral",
            "edge_on": "edge_on"}


def _arrays(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from galpipe.nn.data import ParquetImageDataset

    ds = ParquetImageDataset(path)
    x = np.concatenate([b[0] for b in ds.iter_batches(1024)])
    return x, ds.labels(), ds.objids()


def _task_labels(task: str, y: np.ndarray, objids: np.ndarray, raw: pd.Series) -> tuple[np.ndarray, list[str]]:
    if task == "same":
        return y, ["elliptical", "spiral"]
    classes = ["elliptical", "face_on_spiral", "edge_on"]
    names = raw.reindex(objids).map(NEW_TASK)
    if names.isna().any():
        raise SystemExit(f"{int(names.isna().sum())} galaxies of the split have no GZ1 class in labels.csv")
    return np.array([classes.index(n) for n in names]), classes


def _subsample(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Stratified ``fraction`` of the rows (at least 2 per class), sorted."""
    rng = np.random.default_rng(seed)
    keep = []
    for k in np.unique(y):
        rows = np.flatnonzero(y == k)
        keep.extend(rng.choice(rows, size=max(2, round(fraction * len(rows))), replace=False))
    return np.sort(np.asarray(keep))


def _run(arm: str, task: str, data: dict[str, Any], seed: int, args: argparse.Namespace, exp: dict[str, Any]
         ) -> dict[str, Any]:
    from galpipe.metrics import bootstrap_ci
    from galpipe.nn.data import ArrayDataset
    from galpipe.nn.inference import predict_proba
    from galpipe.nn.model import build_model
    from galpipe.nn.training import fit
    from galpipe.stages.train import full_architecture, init_weights

    classes = data["classes"]
    model = build_model(full_architecture(exp["architecture"], len(classes)), data["x_train"].shape[1:], seed=seed)
    training = {**exp["training"], "epochs": args.epochs, "seed": seed,
                "early_stopping_patience": min(int(exp["training"].get("early_stopping_patience", 8)), 8)}
    if arm != "scratch":
        init_weights(model, args.model, classes)
        training["lr"] = float(exp["training"].get("lr", 0.002)) * (0.25 if arm == "finetune" else 1.0)
        if arm == "frozen":
            last_pool = max(i for i, c in enumerate(model.spec) if c["type"] in ("global_avg_pool", "maxpool2d"))
            training["freeze"] = last_pool + 1
    train = ArrayDataset(data["x_train"], data["y_train"], classes=classes)
    val = ArrayDataset(data["x_val"], data["y_val"], classes=classes)
    t0 = time.perf_counter()
    hist = fit(model, train, val, training, progress=False, log=lambda s: None, display=True)
    seconds = time.perf_counter() - t0
    res = predict_proba(model, data["x_test"], batch_size=256)
    ba, lo, hi = bootstrap_ci(data["y_test"], res.proba, "balanced_accuracy", n_boot=1000, seed=seed)
    return {"task": task, "arm": arm, "seed": seed, "n_train": len(data["y_train"]),
            "epochs": len(hist.epoch), "val_bal": float(np.nanmax(hist.val_balanced_acc)),
            "test_bal": ba, "lo": lo, "hi": hi, "seconds": seconds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gz1", help="the pretrained model (shipped name or folder); default gz1")
    p.add_argument("--fraction", type=float, default=0.1, help="share of the train split used; default 0.1")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="subsample/initialisation seeds")
    p.add_argument("--epochs", type=int, default=30, help="most epochs per run (early stopping); default 30")
    p.add_argument("--tasks", nargs="+", choices=["same", "new"], default=["same", "new"])
    p.add_argument("--arms", nargs="+", choices=["scratch", "finetune", "frozen"],
                   default=["scratch", "finetune", "frozen"])
    p.add_argument("--split", type=Path, default=SPLIT, help="the GZ1 split folder")
    args = p.parse_args()
    if not SHARED.is_dir() or not (args.split / "test.parquet").is_file():
        print(f"skipped: needs {SHARED} and {args.split}/test.parquet "
              "(snakemake --configfile config/gz1-sdss-jpeg.yaml)")
        return 0
    from galpipe.config import preset_search_path, resolve_experiments, validate_config
    from galpipe.models import resolve_model

    note = environment_note()
    if note:
        print(note)
    cfg = validate_config(yaml.safe_load(CONFIG.read_text()))
    exp = resolve_experiments(cfg, preset_search_path(CONFIG))["gz1"]
    raw = pd.read_csv(SHARED / "labels.csv").set_index("objid")["gz1_class_name"]
    print(f"pretrained: {args.model} -> {resolve_model(args.model)}; fraction {args.fraction:g} of the train split; "
          f"seeds {args.seeds}; at most {args.epochs} epochs")
    splits = {s: _arrays(args.split / f"{s}.parquet") for s in ("train", "validation", "test")}
    rows = []
    for task in args.tasks:
        ys = {s: _task_labels(task, y, ids, raw) for s, (_, y, ids) in splits.items()}
        classes = ys["train"][1]
        for seed in args.seeds:
            keep = _subsample(ys["train"][0], args.fraction, seed)
            data = {"classes": classes, "x_train": splits["train"][0][keep], "y_train": ys["train"][0][keep],
                    "x_val": splits["validation"][0], "y_val": ys["validation"][0],
                    "x_test": splits["test"][0], "y_test": ys["test"][0]}
            for arm in args.arms:
                r = _run(arm, task, data, seed, args, exp)
                rows.append(r)
                print(f"  {task:4s} {arm:8s} seed {seed}: n_train {r['n_train']}, {r['epochs']} epochs, "
                      f"val {r['val_bal']:.3f}, test balanced accuracy {r['test_bal']:.3f} "
                      f"[{r['lo']:.3f}, {r['hi']:.3f}] ({r['seconds']:.0f} s)", flush=True)
    df = pd.DataFrame(rows)
    print("\nmean (std) over seeds of the test balanced accuracy:")
    table = df.groupby(["task", "arm"])["test_bal"].agg(["mean", "std", "count"])
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    for task in args.tasks:
        d = df[df.task == task].pivot(index="seed", columns="arm", values="test_bal")
        if "scratch" in d:
            for arm in (a for a in ("finetune", "frozen") if a in d):
                gain = d[arm] - d["scratch"]
                print(f"{task}: {arm} - scratch = {gain.mean():+.3f} (per seed {', '.join(f'{g:+.3f}' for g in gain)})"
                      f" -> {'GAIN' if (gain > 0).all() else 'no consistent gain'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
