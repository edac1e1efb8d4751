"""Snakemake adapter: rule cutouts -> galpipe.stages.cutouts_stage."""
from galpipe.smk import run_stage
from galpipe.stages import cutouts_stage

run_stage(snakemake, cutouts_stage, snakemake.params.cfg, snakemake.input.shard, snakemake.output.manifest,
          snakemake.params.cache_dir)
