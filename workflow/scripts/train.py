"""Snakemake adapter: rule train -> galpipe.stages.train.run."""
from galpipe.smk import run_stage
from galpipe.stages.train import run

run_stage(snakemake, run, snakemake.params.exp, snakemake.input.train, snakemake.input.validation,
          snakemake.output.model, name=snakemake.wildcards.experiment)
