"""Snakemake adapter: rule split -> galpipe.stages.split_stage."""
from galpipe.smk import run_stage
from galpipe.stages import split_stage

outputs = {s: getattr(snakemake.output, s) for s in ("train", "validation", "test")}
run_stage(snakemake, split_stage, snakemake.params.cfg, list(snakemake.input), outputs, snakemake.output.summary)
