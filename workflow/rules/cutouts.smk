rule cutouts:
    input:
        shard=P["shard"],
    output:
        manifest=P["manifest"],
    params:
        cfg=stage_params(CFG, "cutouts"),
        inputs=lambda w: SHARD_INPUTS[w.shard],
        code=CODE["cutouts"],
        cache_dir=CUTOUT_DIR,
    log:
        f"{LOGS}/cutouts/{{shard}}.log",
    benchmark:
        f"{LOGS}/benchmarks/cutouts/{{shard}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=120,
    conda:
        "../envs/galpipe.yaml"
    script:
        "../scripts/cutouts.py"
