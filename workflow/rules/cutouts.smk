rule cutouts:
    input:
        shard=PATHS["shard"],
    output:
        manifest=PATHS["manifest"],
    params:
        cfg=stage_params(CFG, "cutouts"),
        cache_dir=CUTOUT_DIR,
    log:
        "logs/cutouts/{shard}.log",
    benchmark:
        "logs/benchmarks/cutouts/{shard}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=120,
    conda:
        "../envs/galpipe.yaml"
    script:
        "../scripts/cutouts.py"
