"""Snakemake adapter: rule normalise -> galpipe.stages.normalise.run."""
from galpipe.smk import run_stage
from galpipe.stages.normalise import run

run_stage(snakemake, run, snakemake.params.cfg, snakemake.input.manifest, snakemake.input.shard,
          snakemake.output.normalised, snakemake.output.rejects)
