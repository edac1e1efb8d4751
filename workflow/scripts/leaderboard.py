"""Snakemake adapter: rule leaderboard -> galpipe.experiment.leaderboard."""
from galpipe.experiment import leaderboard
from galpipe.smk import run_stage

run_stage(snakemake, leaderboard, snakemake.params.experiments, snakemake.input.metrics, snakemake.input.info,
          snakemake.output.table, snakemake.output.figure,
          html_out=snakemake.output.html)
