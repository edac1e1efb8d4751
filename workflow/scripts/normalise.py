"""Snakemake adapter: rule normalise -> galpipe.stages.normalise_stage."""
from galpipe.smk import run_stage
from galpipe.stages import normalise_stage

run_stage(snakemake, normalise_stage, snakemake.params.cfg, snakemake.input.manifest, snakemake.input.shard,
          snakemake.output.normalised, snakemake.output.rejects)
