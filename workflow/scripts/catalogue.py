"""Snakemake adapter: rule catalogue -> galpipe.stages.catalogue.run."""
from galpipe.smk import run_stage
from galpipe.stages.catalogue import run

run_stage(snakemake, run, snakemake.params.cfg, snakemake.output.catalogue, snakemake.output.shards)
