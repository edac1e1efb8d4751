"""Snakemake adapter: rule evaluate -> galpipe.experiment.evaluate_experiment."""
from galpipe.experiment import evaluate_experiment
from galpipe.smk import run_stage

run_stage(snakemake, evaluate_experiment, snakemake.params.cfg, snakemake.input.model, snakemake.input.test,
          snakemake.output.metrics, snakemake.output.predictions, snakemake.output.figures,
          history=snakemake.input.history)
