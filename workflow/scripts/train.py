"""Snakemake adapter: rule train -> galpipe.experiment.train_experiment."""
from galpipe.experiment import train_experiment
from galpipe.smk import run_stage

run_stage(snakemake, train_experiment, snakemake.params.exp, snakemake.input.train, snakemake.input.validation,
          snakemake.output.model, name=snakemake.wildcards.experiment)
