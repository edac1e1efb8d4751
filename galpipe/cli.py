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
    from galpipe.models import resolve_model
    from galpipe.predict import evaluate_external
    from galpipe.stages import PATHS
    from galpipe.stages.evaluate import run as evaluate_experiment

    params = _evaluate_params(args)
    out = Path(args.output_dir)
    model = resolve_model(args.model)  # a folder, or the name of a shipped model
    model_json = model / Path(PATHS["model"]).name
    if args.test:
        res = evaluate_experiment(params, model_json, args.test, out / Path(PATHS["metrics"]).name,
                                  out / Path(PATHS["predictions"]).name, out / Path(PATHS["figures"]).name)
    elif args.images and args.labels:
        res = evaluate_external(params, model, args.images, args.labels, out, id_column=args.id_column,
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
    from galpipe.predict import output_paths, predict_input

    if (args.input is None) == (args.coords is None):
        raise GalpipeError("predict: give an INPUT (image, folder or catalogue) or --coords CSV, not both")
    if args.coords is not None:
        from galpipe.predict_coords import predict_coords

        if args.crop_fraction is not None:
            raise GalpipeError("predict --coords: --crop-fraction does not apply (the cutouts are fetched framed "
                               "as the model's training images were)")
        from galpipe.models import resolve_model

        df = predict_coords(resolve_model(args.model), args.coords, args.output, tta=args.tta,
                            mc_dropout=args.mc_dropout,
                            config=args.config, seed=args.seed, cache_dir=args.cache_dir, force=args.force)
    else:
        df = predict_input(args.model, args.input, args.output, tta=args.tta, mc_dropout=args.mc_dropout,
                           config=args.config, crop_fraction=args.crop_fraction, seed=args.seed,
                           cache_dir=args.cache_dir, force=args.force, reframe=args.reframe)
    others = [str(p) for p in output_paths(args.output).values() if p != Path(args.output)]
    print(f"{len(df)} predictions -> {args.output} (also {', '.join(others)})")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from galpipe.models import resolve_model
    from galpipe.nn.persist import load_model
    from galpipe.nn.summary import summary

    model, _ = load_model(resolve_model(args.model))  # a folder, or the name of a shipped model
    print(summary(model))
    return 0


def cmd_fake_skyserver(argv: list[str]) -> int:
    from galpipe.testing.fakeserver import main as fake_main

    return int(fake_main(argv) or 0)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help with every option's default and the examples epilog kept as written.

    An option that takes a value and has a default other than None gets
    `` (default: X)`` appended, unless its help already says it; a flag
    (``store_true``) is off unless given, so it shows no default.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" in text or "(default:" in text or action.default in (None, argparse.SUPPRESS)
                or action.nargs == 0 or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def _examples(*lines: str) -> str:
    """An ``Examples:`` epilog, one command per line."""
    return "Examples:\n" + "\n".join(f"  {line}" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="galpipe", description=__doc__.splitlines()[0], formatter_class=HelpFormatter,
        epilog=_examples("galpipe validate-config --config config/config.yaml",
                         "galpipe predict --model results/models/small_cnn galaxies/ --output predictions.csv",
                         "galpipe COMMAND --help      # the options and examples of one command"))
    p.add_argument("--version", action="version", version=f"galpipe {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error instead of the one-line message "
                        "(also: GALPIPE_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from galpipe.models import describe_available

    model_help = f"model folder (model.json + weights.npz), or the name of a shipped model: {describe_available()}"

    def add(name: str, func, help_: str, examples: Sequence[str], config: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_, epilog=_examples(*examples),
                            formatter_class=HelpFormatter)
        sp.set_defaults(func=func)
        if config:
            sp.add_argument("--config", default="config/config.yaml", metavar="YAML",
                            help="the pipeline config file (validated against galpipe's schema)")
        return sp

    shard0 = PATHS["shard"].format(shard="0000")
    manifest0 = PATHS["manifest"].format(shard="0000")
    normalised0 = PATHS["normalised"].format(shard="0000")
    add("validate-config", cmd_validate, "validate a config file and every experiment's architecture",
        ["galpipe validate-config", "galpipe validate-config --config config/gz1-sdss-jpeg.yaml"])

    sp = add("catalogue", cmd_catalogue, "build the catalogue of the configured source and its shards",
             ["galpipe catalogue", "galpipe catalogue --config config/sdss.yaml --output results/sdss/"
              "catalogue/catalogue.parquet --shard-dir results/sdss/catalogue/shards"])
    sp.add_argument("--output", default=PATHS["catalogue"], metavar="PARQUET", help="the catalogue file to write")
    sp.add_argument("--shard-dir", default=str(Path(PATHS["shard"]).parent), metavar="DIR",
                    help="folder of the shard files (config key 'shards' sets how many)")

    sp = add("cutouts", cmd_cutouts, "make/fetch the FITS cutouts of one catalogue shard",
             [f"galpipe cutouts --shard {shard0} --output {manifest0}",
              f"galpipe cutouts --config config/sdss.yaml --shard {shard0} --output {manifest0}"])
    sp.add_argument("--shard", required=True, metavar="PARQUET", help="the catalogue shard to make cutouts of")
    sp.add_argument("--output", required=True, metavar="PARQUET",
                    help="the manifest to write: every galaxy's cutout path, or why it failed")

    sp = add("normalise", cmd_normalise, "normalise the cutouts of one shard to float32 arrays",
             [f"galpipe normalise --manifest {manifest0} --shard {shard0} --output {normalised0} "
              f"--rejects {PATHS['rejects'].format(shard='0000')}"])
    sp.add_argument("--manifest", required=True, metavar="PARQUET", help="the shard's cutouts manifest (cutouts)")
    sp.add_argument("--shard", required=True, metavar="PARQUET", help="the catalogue shard (labels, positions)")
    sp.add_argument("--output", required=True, metavar="PARQUET", help="the normalised images to write")
    sp.add_argument("--rejects", required=True, metavar="PARQUET",
                    help="where to list the galaxies rejected, with the reason")

    sp = add("split", cmd_split, "split normalised shards into train/validation/test Parquet",
             [f"galpipe split {Path(normalised0).parent}/*.parquet",
              "galpipe split --config config/sdss.yaml --output-dir results/sdss/split "
              "results/sdss/normalised/0000.parquet"])
    sp.add_argument("--output-dir", default=str(Path(PATHS["split_summary"]).parent), metavar="DIR",
                    help="folder of the split files and summary.json")
    sp.add_argument("inputs", nargs="+", metavar="NORMALISED", help="normalised shard files (normalise)")

    sp = add("train", cmd_train, "train one experiment of the config",
             ["galpipe train --experiment small_cnn --output-dir results/models/small_cnn",
              "galpipe train --config config/gz1-sdss-jpeg.yaml --experiment vgg_like "
              "--train results/gz1-sdss-jpeg/split/train.parquet "
              "--validation results/gz1-sdss-jpeg/split/validation.parquet --output-dir models/vgg_like"])
    sp.add_argument("--experiment", required=True, metavar="NAME", help="an experiment named in the config")
    sp.add_argument("--train", default=PATHS["split"].format(split="train"), metavar="PARQUET",
                    help="the training split")
    sp.add_argument("--validation", default=PATHS["split"].format(split="validation"), metavar="PARQUET",
                    help="the validation split (chooses the best epoch, early stopping)")
    sp.add_argument("--output-dir", required=True, metavar="DIR",
                    help="model folder to write: model.json, weights.npz, history.csv, train_info.json")

    sp = add("evaluate", cmd_evaluate, "score a trained model on a test split or an external labelled image set",
             ["galpipe evaluate --model results/models/small_cnn --test results/split/test.parquet "
              "--output-dir eval/small_cnn",
              "galpipe evaluate --model results/gz1-sdss-jpeg/models/vgg_like --images gz1/ --labels gz1/labels.csv "
              "--label-column gz1_class_name --label-map spiral_cw=spiral spiral_acw=spiral merger= "
              "--output-dir eval/gz1"], config=False)
    sp.add_argument("--model", required=True, metavar="DIR|NAME", help=model_help)
    sp.add_argument("--test", metavar="PARQUET",
                    help="a split Parquet file (made by the split stage); give it, or --images and --labels")
    sp.add_argument("--images", metavar="DIR", help="folder of images (JPEG/PNG/FITS); needs --labels")
    sp.add_argument("--labels", metavar="CSV", help="labels CSV for --images: an id, a label and a file per row")
    sp.add_argument("--id-column", default="objid", metavar="NAME", help="the labels CSV's id column")
    sp.add_argument("--label-column", default="label", metavar="NAME", help="the labels CSV's label column")
    sp.add_argument("--path-column", default="image", metavar="NAME",
                    help="the labels CSV's image file column (relative to --images)")
    sp.add_argument("--label-map", nargs="*", metavar="RAW=CLASS",
                    help="map the CSV's labels to the model's classes; RAW= drops those rows "
                         "(default: labels must already be class names)")
    sp.add_argument("--crop-fraction", type=float, default=None, metavar="F",
                    help="centre crop of the images, fraction of the shorter side "
                         "(default: the model's preprocess.crop_fraction)")
    sp.add_argument("--output-dir", required=True, metavar="DIR",
                    help="where metrics.json, predictions.parquet and figures/ go")
    sp.add_argument("--no-tta", action="store_true", help="skip the test-time-augmentation evaluation")
    sp.add_argument("--mc-dropout", type=int, default=None, metavar="N",
                    help="Monte Carlo dropout passes (default: the config schema's evaluate.mc_dropout)")
    sp.add_argument("--n-bootstrap", type=int, default=None, metavar="N",
                    help="bootstrap resamples for the confidence intervals "
                         "(default: the config schema's evaluate.n_bootstrap)")
    sp.add_argument("--seed", type=int, default=None, help="bootstrap seed (default: the config schema's seed)")

    sp = add("predict", cmd_predict, "classify a FITS/JPEG file, a folder of them, a catalogue, or positions",
             ["galpipe predict --model gz1 galaxies/ --tta --output gz1.csv    # a shipped model, by name",
              "galpipe predict --model results/sdss/models/small_cnn new_galaxies.csv --config config/sdss.yaml "
              "--output new.parquet",
              "galpipe predict --model gz1 --coords galaxies.csv --output gz1.csv    # SkyServer cutouts by position"],
             config=False)
    sp.add_argument("--model", required=True, metavar="DIR|NAME", help=model_help)
    what = sp.add_mutually_exclusive_group()
    what.add_argument("input", metavar="INPUT", nargs="?", default=None,
                      help="an image file (FITS/JPEG/PNG), a folder of them, or a catalogue (.csv/.parquet with "
                           "objid, ra, dec, ...) whose cutouts --config's source fetches; or give --coords")
    what.add_argument("--coords", metavar="CSV", default=None,
                      help="classify galaxies by position instead of INPUT: a CSV with ra, dec (degrees) and "
                           "optionally petroR90_r (arcsec; looked up on SkyServer where missing), objid, name; "
                           "SkyServer JPEG cutouts framed as the model's training images are fetched from "
                           "--config's sdss: section (without --config: the public SkyServer, DR17); "
                           "default: none")
    sp.add_argument("--output", default="predictions.csv", metavar="FILE",
                    help=".csv, .parquet, .ecsv or .fits; an ECSV and a FITS table (astropy, with units and the "
                         "model's provenance) are also written beside it, with the same name")
    sp.add_argument("--force", action="store_true",
                    help="classify inputs that do not match the model's input contract (channels, bands, pixel "
                         "unit, pixel scale); the differences are recorded as warnings in the output's metadata")
    sp.add_argument("--tta", action="store_true", help="average over the 8 rotations/flips of each image")
    sp.add_argument("--mc-dropout", type=int, default=0, metavar="N",
                    help="Monte Carlo dropout passes, adding std_<class> columns; 0 turns it off")
    sp.add_argument("--reframe", choices=["auto", "always", "off"], default="auto",
                    help="bring each galaxy to the size it had in the training stamps, measured on the image "
                         "(90%%-light radius of the central source against the model's framing_measured): auto "
                         "only when it is 1.6x to 2.5x too large or too small (beyond: a neighbour merged with "
                         "it, left alone), always, or off; the factor applied is the output's reframe column "
                         "(models without a measured framing: never)")
    sp.add_argument("--config", default=None, metavar="YAML",
                    help="config whose source fetches the cutouts of a catalogue INPUT (needed for one); with "
                         "--coords, its sdss: section names the SkyServer and data release (default: none, i.e. "
                         "the schema's sdss defaults for --coords)")
    sp.add_argument("--crop-fraction", type=float, default=None, metavar="F",
                    help="centre crop of the images, fraction of the shorter side "
                         "(default: the model's preprocess.crop_fraction)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the MC-dropout masks")
    sp.add_argument("--cache-dir", default=CUTOUT_CACHE_ROOT, metavar="DIR",
                    help="where a catalogue input's (or --coords') cutouts are cached (the pipeline's cache, "
                         "relative to the current directory)")

    sp = add("summary", cmd_summary, "print a trained model's layers, shapes, parameters and FLOPs",
             ["galpipe summary --model results/models/small_cnn"], config=False)
    sp.add_argument("--model", required=True, metavar="DIR|NAME", help=model_help)
    sub.add_parser("fake-skyserver", help="run the offline stand-in SkyServer/SAS on 127.0.0.1 "
                                          "(galpipe fake-skyserver --help: its options)", add_help=False)
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
