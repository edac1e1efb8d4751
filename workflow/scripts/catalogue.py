"""Snakemake adapter: rule catalogue -> galpipe.stages.catalogue_stage."""
from galpipe.smk import run_stage
from galpipe.stages import catalogue_stage

run_stage(snakemake, catalogue_stage, snakemake.params.cfg, snakemake.output.catalogue, snakemake.output.shards)
