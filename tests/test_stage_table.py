"""One table of stage names, paths and shard/split names, read by the Snakefile and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from galpipe.cli import build_parser
from galpipe.config import load_config, load_settings, preset_search_path, resolve_experiments
from galpipe.settings import Config
from galpipe.stages import PATHS, SPLITS, STAGES, shard_names, stage_params

REPO = Path(__file__).resolve().parents[1]


def _subcommand_defaults(name: str) -> dict:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")  # argparse keeps subparsers here
    return {a.dest: a.default for a in sub.choices[name]._actions}


def test_cli_defaults_come_from_the_table():
    assert _subcommand_defaults("catalogue")["output"] == PATHS["catalogue"]
    assert Path(_subcommand_defaults("catalogue")["shard_dir"]) == Path(PATHS["shard"]).parent
    assert Path(_subcommand_defaults("split")["output_dir"]) == Path(PATHS["split_summary"]).parent
    train = _subcommand_defaults("train")
    assert (train["train"], train["validation"]) == (PATHS["split"].format(split="train"),
                                                      PATHS["split"].format(split="validation"))


def test_snakefile_outputs_are_the_table(tmp_path):
    """Every file the workflow would make is a PATHS entry, with the table's shard and split names."""
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "--summary", "--cores", "1", "-s", str(REPO / "workflow" / "Snakefile"),
         "-d", str(tmp_path), "--configfile", str(REPO / "config" / "config.yaml")],
        capture_output=True, text=True, timeout=300, check=True)
    files = {line.split("\t")[0] for line in out.stdout.splitlines()[1:] if line.strip()}
    raw = load_config(REPO / "config" / "config.yaml")
    cfg = Config.from_dict(raw)
    experiments = resolve_experiments(raw, preset_search_path(REPO / "config" / "config.yaml"))
    assert len(experiments) >= 2
    expected = {PATHS["catalogue"], PATHS["split_summary"], PATHS["leaderboard"], PATHS["leaderboard_html"],
                PATHS["comparison"], PATHS["dataset_html"]}
    for shard in shard_names(cfg.shards):
        expected |= {PATHS[k].format(shard=shard) for k in ("shard", "manifest", "normalised", "rejects")}
    expected |= {PATHS["split"].format(split=s) for s in SPLITS}
    for exp in experiments:
        expected |= {PATHS[k].format(experiment=exp) for k in
                     ("model", "weights", "history", "train_info", "metrics", "predictions", "figures")}
    assert files == expected


def test_every_stage_declares_its_params():
    cfg = load_settings({})
    for stage in ("catalogue", "cutouts", "normalise", "split", "evaluate", "preprocess"):
        params = stage_params(cfg, stage)
        assert isinstance(params, dict) and params, stage
    assert stage_params(cfg, "split") == {"split": cfg.split.to_dict(), "seed": cfg.seed}
    assert "cutout_size" not in stage_params(cfg, "catalogue")  # the stamp size does not change the catalogue
    assert set(STAGES) >= {"catalogue", "cutouts", "normalise", "split", "train", "evaluate", "leaderboard"}
