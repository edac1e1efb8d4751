"""Snakemake adapter: rule leaderboard -> galpipe.stages.leaderboard.run."""
from galpipe.smk import run_stage
from galpipe.stages.leaderboard import run

run_stage(snakemake, run, snakemake.params.experiments, snakemake.input.metrics, snakemake.input.info,
          snakemake.output.table, snakemake.output.figure,
          html_out=snakemake.output.html, catalogue=snakemake.input.catalogue,
          split_summary=snakemake.input.split_summary, dataset_out=snakemake.output.dataset)
