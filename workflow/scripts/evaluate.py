"""Snakemake adapter: rule evaluate -> galpipe.stages.evaluate.run."""
from galpipe.smk import run_stage
from galpipe.stages.evaluate import run

run_stage(snakemake, run, snakemake.params.cfg, snakemake.input.model, snakemake.input.test,
          snakemake.output.metrics, snakemake.output.predictions, snakemake.output.figures,
          history=snakemake.input.history)
