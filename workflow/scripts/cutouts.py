"""Snakemake adapter: rule cutouts -> galpipe.stages.cutouts.run."""
from galpipe.smk import run_stage
from galpipe.stages.cutouts import run

run_stage(snakemake, run, snakemake.params.cfg, snakemake.input.shard, snakemake.output.manifest,
          snakemake.params.cache_dir)
