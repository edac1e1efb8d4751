"""The ``galpipe`` command line: every pipeline stage, plus tools around trained models.

The Snakemake workflow calls the same functions (through ``workflow/scripts``);
the CLI is for running a stage by hand, inspecting a config or a model, and
scoring or applying a trained model.

Errors: a failure the user can cause or fix (a :class:`~galpipe.errors.GalpipeError`
naming the bad input, or an :class:`OSError` such as a full disk, a permission
denied, a read-only file system or a missing folder) prints one line,
``galpipe <command>: error: <cause> (<file>)``, to stderr and exits 1, with no
traceback.  ``galpipe --debug <command>`` (or ``GALPIPE_DEBUG=1``) shows the
traceback instead.  Any other exception is a bug in galpipe: it is not turned
into a one-liner but propagates with its full traceback (exit 1), ending with a
note that it is a bug to report.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from galpipe import __version__
from galpipe.errors import GalpipeError
from galpipe.stages import CUTOUT_CACHE_ROOT, PATHS


def _load(args: argparse.Namespace) -> dict:
    from galpipe.config import load_config

    return load_config(args.config)


def _settings(args: argparse.Namespace):  # -> galpipe.settings.Config
    from galpipe.settings import Config

    return Config.from_dict(_load(args))


def _presets(args: argparse.Namespace) -> list:
    from galpipe.config import preset_search_path

    return preset_search_path(args.config)


def cmd_validate(args: argparse.Namespace) -> int:
    from galpipe.config import resolve_experiments
    from galpipe.stages.train import check_architectures

    cfg = _load(args)
    exps = resolve_experiments(cfg, _presets(args))
    check_architectures(cfg, exps)  # shapes must fit together before any training starts
    print(f"{args.config}: valid ({len(exps)} experiment(s): {', '.join(exps)})")
    return 0


def cmd_catalogue(args: argparse.Namespace) -> int:
    from galpipe.stages import shard_paths, stage_params
    from galpipe.stages.catalogue import run

    cfg = _settings(args)
    shards = shard_paths("shard", cfg.shards, args.shard_dir)
    n = run(stage_params(cfg, "catalogue"), args.output, shards)
    print(f"{n} galaxies -> {args.output} ({len(shards)} shards in {args.shard_dir})")
    return 0


def cmd_cutouts(args: argparse.Namespace) -> int:
    from galpipe.stages import cutout_cache_dir, stage_params
    from galpipe.stages.cutouts import run

    cfg = _settings(args)
    m = run(stage_params(cfg, "cutouts"), args.shard, args.output, cutout_cache_dir(cfg), progress=True)
    print(f"{int((m['status'] == 'ok').sum())} cutouts ok, {int((m['status'] != 'ok').sum())} failed -> {args.output}")
    return 0


def cmd_normalise(args: argparse.Namespace) -> int:
    from galpipe.stages import stage_params
    from galpipe.stages.normalise import run

    stats = run(stage_params(_settings(args), "normalise"), args.manifest, args.shard, args.output, args.rejects)
    print(json.dumps(stats))
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from galpipe.stages import PATHS, split_paths, stage_params
    from galpipe.stages.split import run

    out = Path(args.output_dir)
    summary = run(stage_params(_settings(args), "split"), args.inputs, split_paths(out),
                  out / Path(PATHS["split_summary"]).name)
    print(json.dumps(summary["counts"]))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from galpipe.config import resolve_experiments
    from galpipe.stages import experiment_params
    from galpipe.stages.train import run as train_experiment

    cfg = _load(args)
    exps = resolve_experiments(cfg, _presets(args))
    if args.experiment not in exps:
        raise GalpipeError(f"experiment {args.experiment!r} not in the config; choose from {sorted(exps)}")
    exp = experiment_params(_settings(args), exps[args.experiment])
    info = train_experiment(exp, args.train, args.validation, Path(args.output_dir) / "model.json",
                            name=args.experiment)
    print(json.dumps(info))
    return 0


def _evaluate_params(args: argparse.Namespace) -> dict:
    """The evaluate stage's params: the schema's defaults, overridden by the options given."""
    from galpipe.config import load_settings
    from galpipe.stages import stage_params

    given = {"tta": False if args.no_tta else None, "mc_dropout": args.mc_dropout, "n_bootstrap": args.n_bootstrap}
    top = {"seed": args.seed} if args.seed is not None else {}
    cfg = load_settings({"evaluate": {k: v for k, v in given.items() if v is not None}, **top})
    return stage_params(cfg, "evaluate")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from galpipe.predict import evaluate_external
    from galpipe.stages import PATHS
    from galpipe.stages.evaluate import run as evaluate_experiment

    params = _evaluate_params(args)
    out = Path(args.output_dir)
    model_json = Path(args.model) / Path(PATHS["model"]).name
    if args.test:
        res = evaluate_experiment(params, model_json, args.test, out / Path(PATHS["metrics"]).name,
                                  out / Path(PATHS["predictions"]).name, out / Path(PATHS["figures"]).name)
    elif args.images and args.labels:
        res = evaluate_external(params, args.model, args.images, args.labels, out, id_column=args.id_column,
                                label_column=args.label_column, path_column=args.path_column,
                                label_map=_parse_map(args.label_map), crop_fraction=args.crop_fraction)
    else:
        raise GalpipeError("evaluate needs --test SPLIT.parquet, or --images DIR and --labels CSV")
    h = res["headline"]
    print(json.dumps({k: v["value"] if v else None for k, v in h.items()}))
    return 0


def _parse_map(items: Sequence[str] | None) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for item in items or []:
        if "=" not in item:
            raise GalpipeError(f"--label-map {item!r}: expected RAW=CLASS (or RAW= to drop)")
        raw, cls = item.split("=", 1)
        out[raw] = cls or None
    return out


def cmd_predict(args: argparse.Namespace) -> int:
    from galpipe.predict import predict_input

    df = predict_input(args.model, args.input, args.output, tta=args.tta, mc_dropout=args.mc_dropout,
                       config=args.config, crop_fraction=args.crop_fraction, seed=args.seed,
                       cache_dir=args.cache_dir)
    print(f"{len(df)} predictions -> {args.output}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from galpipe.nn.persist import load_model
    from galpipe.nn.summary import summary

    model, _ = load_model(args.model)
    print(summary(model))
    return 0


def cmd_fake_skyserver(argv: list[str]) -> int:
    from galpipe.testing.fakeserver import main as fake_main

    return int(fake_main(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="galpipe", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"galpipe {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error instead of the one-line message "
                        "(also: GALPIPE_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help_: str, config: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=func)
        if config:
            sp.add_argument("--config", default="config/config.yaml", help="config YAML (default: %(default)s)")
        return sp

    add("validate-config", cmd_validate, "validate a config file and every experiment's architecture")
    sp = add("catalogue", cmd_catalogue, "build the catalogue of the configured source and its shards")
    sp.add_argument("--output", default=PATHS["catalogue"], help="catalogue Parquet (default: %(default)s)")
    sp.add_argument("--shard-dir", default=str(Path(PATHS["shard"]).parent),
                    help="folder of the shard files (default: %(default)s)")
    sp = add("cutouts", cmd_cutouts, "make/fetch the FITS cutouts of one catalogue shard")
    sp.add_argument("--shard", required=True)
    sp.add_argument("--output", required=True, help="manifest Parquet")
    sp = add("normalise", cmd_normalise, "normalise the cutouts of one shard to float32 arrays")
    for a in ("--manifest", "--shard", "--output", "--rejects"):
        sp.add_argument(a, required=True)
    sp = add("split", cmd_split, "split normalised shards into train/validation/test Parquet")
    sp.add_argument("--output-dir", default=str(Path(PATHS["split_summary"]).parent),
                    help="folder of the split files (default: %(default)s)")
    sp.add_argument("inputs", nargs="+")
    sp = add("train", cmd_train, "train one experiment of the config")
    sp.add_argument("--experiment", required=True)
    sp.add_argument("--train", default=PATHS["split"].format(split="train"), help="default: %(default)s")
    sp.add_argument("--validation", default=PATHS["split"].format(split="validation"), help="default: %(default)s")
    sp.add_argument("--output-dir", required=True)
    sp = add("evaluate", cmd_evaluate, "score a trained model on a test split or an external labelled image set",
             config=False)
    sp.add_argument("--model", required=True, help="model directory (model.json + weights.npz)")
    sp.add_argument("--test", help="a split Parquet file")
    sp.add_argument("--images", help="folder of images (JPEG/PNG/FITS)")
    sp.add_argument("--labels", help="labels CSV for --images")
    sp.add_argument("--id-column", default="objid")
    sp.add_argument("--label-column", default="label")
    sp.add_argument("--path-column", default="image")
    sp.add_argument("--label-map", nargs="*", metavar="RAW=CLASS")
    sp.add_argument("--crop-fraction", type=float, default=None)
    sp.add_argument("--output-dir", required=True)
    sp.add_argument("--no-tta", action="store_true", help="skip the test-time-augmentation evaluation")
    sp.add_argument("--mc-dropout", type=int, default=None,
                    help="Monte Carlo dropout passes (default: the config schema's evaluate.mc_dropout)")
    sp.add_argument("--n-bootstrap", type=int, default=None,
                    help="bootstrap resamples (default: the config schema's evaluate.n_bootstrap)")
    sp.add_argument("--seed", type=int, default=None, help="bootstrap seed (default: the config schema's seed)")
    sp = add("predict", cmd_predict, "classify a FITS/JPEG file, a folder of them, or a catalogue", config=False)
    sp.add_argument("--model", required=True)
    sp.add_argument("input")
    sp.add_argument("--output", default="predictions.csv", help=".csv or .parquet")
    sp.add_argument("--tta", action="store_true")
    sp.add_argument("--mc-dropout", type=int, default=0)
    sp.add_argument("--config", default=None, help="config whose source fetches cutouts for a catalogue input")
    sp.add_argument("--crop-fraction", type=float, default=None)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--cache-dir", default=CUTOUT_CACHE_ROOT,
                    help="where a catalogue input's cutouts are cached (default: the pipeline's cache, "
                         "relative to the current directory)")
    sp = add("summary", cmd_summary, "print a trained model's layers, shapes, parameters and FLOPs", config=False)
    sp.add_argument("--model", required=True)
    sub.add_parser("fake-skyserver", help="run the offline stand-in SkyServer/SAS on 127.0.0.1", add_help=False)
    return p


def _run_command(command: str, func: Callable[[], int], debug: bool) -> int:
    """Run ``func``; a user-caused failure becomes one line on stderr and exit 1 (see the module docstring)."""
    from galpipe.smk import debug_requested, describe_os_error

    debug = debug or debug_requested()
    try:
        return int(func())
    except (GalpipeError, OSError) as exc:
        if debug:
            raise
        msg = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        print(f"galpipe {command}: error: {msg}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: keep the traceback, say what it is
        exc.add_note(f"galpipe {command}: internal error: this is a bug in galpipe, "
                     "please report it with the traceback above")
        raise


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    n_debug = 0
    while argv[n_debug:n_debug + 1] == ["--debug"]:
        n_debug += 1
    if argv[n_debug:n_debug + 1] == ["fake-skyserver"]:  # it parses its own options
        rest = argv[n_debug + 1:]
        return _run_command("fake-skyserver", lambda: cmd_fake_skyserver(rest), n_debug > 0)
    args = build_parser().parse_args(argv)
    from galpipe.smk import setup_logging

    setup_logging()
    return _run_command(args.command, lambda: args.func(args), args.debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
