"""Snakemake adapter: rule split -> galpipe.stages.split.run."""
from galpipe.smk import run_stage
from galpipe.stages import SPLITS
from galpipe.stages.split import run

outputs = {s: getattr(snakemake.output, s) for s in SPLITS}
run_stage(snakemake, run, snakemake.params.cfg, list(snakemake.input), outputs, snakemake.output.summary)
